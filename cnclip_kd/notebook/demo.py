"""``cnclip-kd demo``: the whole kit on the sample data in one command.

Runs notebooks 01–06 in order through papermill — the very notebooks in
``notebooks/``, with their own defaults and one shared ``OUTPUT_DIR`` — keeps
the executed copies (with every output) under ``OUT/notebooks/`` and ends with
a summary: the comparison table notebook 02 recorded (teacher, fine-tune, KD),
the Top-10 figures and training curves, and the deployed encoder with its
measured query latency (notebook 06)::

    from cnclip_kd.notebook.demo import run_demo

    summary = run_demo("out")               # ~30 minutes on 2 CPU cores (notebook 06 plans ~10 of them)
    print(summary.to_text())

Resumable and safe to rerun:

* ``OUT/demo-state.json`` (written atomically) marks the folder as a demo
  output and records, per notebook, a key of its inputs: the notebook file's
  content, its parameters and the key of the notebook before it.  A notebook
  whose key is unchanged, whose last run finished, whose executed copy holds
  its recorded results (:func:`cnclip_kd.notebook.records.read_records`) and whose
  recorded output files under ``OUT`` all exist is skipped.
* A failing notebook stops the run with a :class:`DemoError` naming the
  notebook, the failing cell (index and first source line), the error and the
  executed copy; rerunning after a fix skips what already finished.
* An existing ``OUT`` that is not empty and is not a demo output is refused,
  never written to.

The kernel (``python3``) runs in ``OUT`` with this checkout's ``cnclip_kd``
first on its ``PYTHONPATH``, so it imports the same package as the caller.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.files import atomic_write_json
from .records import read_records

logger = logging.getLogger(__name__)

__all__ = [
    "NOTEBOOKS", "PRESETS", "DemoError", "DemoSummary", "NotebookRun", "notebook_literal", "parse_overrides",
    "run_demo",
]

#: The notebooks the demo runs, in order (file stems under ``notebooks/``).
NOTEBOOKS = ("01_prepare_data", "02_distill", "03_build_index", "04_visualize_top10", "05_query_demo",
             "06_deploy_cpu")

#: The checkout's notebooks (the package lives beside them).
NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"

#: Marker and state file of a demo output folder.
STATE_FILE = "demo-state.json"
#: The summary of the last complete run, beside the state.
SUMMARY_FILE = "demo-summary.json"
#: Executed copies go to ``OUT/<EXECUTED_DIR>/<notebook>.ipynb``.
EXECUTED_DIR = "notebooks"
KERNEL_NAME = "python3"
_STATE_KIND = "cnclip-kd demo"
_STATE_VERSION = 1
_LOCK_FILE = ".demo.lock"

#: Parameter sets by preset: notebook stem → parameters on top of the notebook's own defaults
#: (``OUTPUT_DIR`` is always ``--out``).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The notebooks exactly as they are: notebook 02's offline CPU demo (EfficientNet-Lite2 teacher, a student with
    # an ImageNet-pretrained EfficientNet-Lite0 image tower at 64 px, 15 epochs), indexes, figures, the widget, ONNX
    # deployment.
    "demo": {},
    # The same with the demo's student at 128 px: better P@10, where KD no longer adds to it; ~5 minutes more.
    "demo-pretrained": {"02_distill": {"PRESET": "demo-pretrained"}},
    # The same with the demo's student up to 0.3.3: a small ResNet trained from scratch (80 epochs).
    "demo-scratch": {"02_distill": {"PRESET": "demo-scratch"}},
    # The from-scratch student with a longer recipe (16 views, 200 epochs): ~17 minutes more.
    "demo-long": {"02_distill": {"PRESET": "demo-long"}},
    # A smoke test in a few minutes: the same steps with notebook 02's `tiny` preset (a tiny ViT student, a tiny
    # random-weight teacher, 2 epochs), smaller images and fewer checks. Its numbers mean nothing.
    "tiny": {
        "01_prepare_data": {"MAX_SIDE": 128, "PER_CATEGORY": 2},
        # Every loss and both rows of unlabelled photos: seconds here.
        "02_distill": {"PRESET": "tiny", "COMPARE_LOSSES": "cosine,feature,relation",
                       "COMPARE_KD_IMAGES": "inductive,transductive"},
        "04_visualize_top10": {"MODELS": ["tiny-kd-relation", "tiny-finetune"]},
        "05_query_demo": {"MODELS": ["tiny-kd-relation", "tiny-finetune"]},
        "06_deploy_cpu": {"CHECK_IMAGES": 40, "LATENCY_REPEATS": 2, "THREADS": 1, "PLAN_CANDIDATES": ""},
    },
}


#: Parameters taken from an earlier notebook's recorded results unless the preset or the caller set them:
#: notebooks 03 and 06 index and deploy the distilled student notebook 02 trained (left empty, they would take
#: the newest run, which after 02's comparison runs is another one).
FROM_RECORDS: dict[str, dict[str, tuple[str, str]]] = {
    "03_build_index": {"CHECKPOINT": ("02_distill", "checkpoint")},
    "06_deploy_cpu": {"CHECKPOINT": ("02_distill", "checkpoint")},
}


class DemoError(RuntimeError):
    """The demo cannot start, or a notebook failed; the message says which, where and what to do."""


@dataclass
class NotebookRun:
    """One notebook of a demo run.

    Attributes:
        name: File stem, e.g. ``02_distill``.
        status: ``"ran"`` or ``"skipped"`` (up to date from an earlier run).
        elapsed_s: Seconds it took (for a skipped notebook: its earlier run's).
        executed: The executed copy, with outputs.
        parameters: The parameters it ran with (on top of its defaults).
    """

    name: str
    status: str
    elapsed_s: float
    executed: str
    parameters: dict = field(default_factory=dict)


@dataclass
class DemoSummary:
    """What a demo run produced, read back from the notebooks' recorded results.

    Attributes:
        out_dir: The output folder (absolute).
        preset: The parameter preset.
        total_s: Wall time of this run, seconds.
        notebooks: One :class:`NotebookRun` per notebook, in order.
        comparison: Notebook 02's comparison rows (teacher, fine-tune, each KD loss) on the test split,
            exactly as it recorded them.
        curves: Notebook 02's training-curves PNG.
        top10_figures: Notebook 04's Top-10 PNG per model (image query).
        text_top10_figures: Notebook 04's Top-10 PNG per model for its text query.
        text_query: That text query.
        deploy_figures: Notebook 06's Top-10 PNGs through the deployed encoders (image, text).
        encoder: The deployed image encoder (ONNX file) and ``backend``.
        text_encoder: The deployed text encoder and ``text_backend``.
        latency: The deployed image encoder's measured end-to-end query latency row (notebook 06:
            ``backend``, ``total`` / ``encode`` / ... with ``p50`` and ``p95`` in ms).
        text_latency: Likewise for the text encoder.
        plan: Notebook 06's latency-budget plan choice (candidate student, back-end, measured p50), if it
            planned and something met ``plan_budget_ms``.
        plan_budget_ms: That budget.
    """

    out_dir: str
    preset: str
    total_s: float
    notebooks: list = field(default_factory=list)
    comparison: list = field(default_factory=list)
    curves: str | None = None
    top10_figures: dict = field(default_factory=dict)
    text_top10_figures: dict = field(default_factory=dict)
    text_query: str = ""
    deploy_figures: list = field(default_factory=list)
    encoder: str | None = None
    backend: str | None = None
    text_encoder: str | None = None
    text_backend: str | None = None
    latency: dict | None = None
    text_latency: dict | None = None
    plan: dict | None = None
    plan_budget_ms: float | None = None

    def to_dict(self) -> dict:
        """The summary as plain JSON types."""
        return asdict(self)

    def to_text(self) -> str:
        """A short human summary: the comparison table, the figures, the deployed encoders and their latency."""
        ran = sum(n.status == "ran" for n in self.notebooks)
        lines = [(f"cnclip-kd demo ({self.preset}): {len(self.notebooks)} notebooks in {self.total_s:.1f} s "
                 f"({ran} run, {len(self.notebooks) - ran} skipped) -> {self.out_dir}"), ""]
        if self.comparison:
            lines.append("对比 comparison (notebook 02, test split, image -> image; T->I: text -> image):")
            lines.append(_comparison_text(self.comparison))
            lines.append("")
        if self.curves:
            lines.append(f"训练曲线 training curves: {self.curves}")
        if self.top10_figures:
            lines.append("Top-10 图 figures (notebook 04):")
            lines += [f"  {name}: {path}" for name, path in self.top10_figures.items()]
        if self.text_top10_figures:
            lines.append(f"Top-10 文本查询 text query “{self.text_query}” (notebook 04):")
            lines += [f"  {name}: {path}" for name, path in self.text_top10_figures.items()]
        if self.deploy_figures:
            lines.append("Top-10 部署后 through the deployed encoders (notebook 06):")
            lines += [f"  {path}" for path in self.deploy_figures]
        if self.encoder:
            lines.append("")
            lines.append(f"部署 deployed image encoder: {self.encoder} ({self.backend})")
            if self.latency:
                lines.append(f"  查询延迟 query latency, end to end: {_latency_text(self.latency)}")
        if self.text_encoder:
            lines.append(f"部署 deployed text encoder: {self.text_encoder} ({self.text_backend})")
            if self.text_latency:
                lines.append(f"  查询延迟 query latency, end to end: {_latency_text(self.text_latency)}")
        if self.plan:
            p50 = (self.plan.get("total") or {}).get("p50")
            budget = "" if self.plan_budget_ms is None else f"p50 ≤ {self.plan_budget_ms:g} ms, "
            lines.append(f"延迟预算规划 latency plan ({budget}notebook 06): "
                         f"{self.plan.get('candidate')} served by {self.plan.get('backend')}"
                         + (f", p50 {p50:.1f} ms" if p50 is not None else ""))
        elif self.plan_budget_ms is not None:
            lines.append(f"延迟预算规划 latency plan (notebook 06): no candidate met p50 ≤ {self.plan_budget_ms:g} ms "
                         "on this machine (its table is in the executed notebook)")
        lines.append("")
        lines.append(f"执行后的 Notebook executed notebooks (open them to see every output): "
                     f"{Path(self.out_dir) / EXECUTED_DIR}")
        return "\n".join(lines)


def fmt_metric(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _comparison_text(rows: list) -> str:
    keys = ("p@10", "map@10", "teacher@10", "t2i/r@10", "t2i/cat-p@10")
    head = ["model", "KD", "P@10", "mAP@10", "teacher@10", "T->I R@10", "T->I cat P@10"]
    table = [head] + [[str(r.get("model", "")), str(r.get("kd_loss", ""))] + [fmt_metric(r.get(k)) for k in keys]
                      for r in rows]
    widths = [max(_width(row[i]) for row in table) for i in range(len(head))]
    out = []
    for n, row in enumerate(table):
        cells = [c + " " * (w - _width(c)) if i < 2 else " " * (w - _width(c)) + c
                 for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  " + "  ".join(cells).rstrip())
        if n == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _width(text: str) -> int:
    """Terminal columns of ``text``: CJK characters take two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _latency_text(row: Mapping) -> str:
    total = row.get("total") or {}
    encode = row.get("encode") or {}
    text = f"p50 {total.get('p50', float('nan')):.1f} ms, p95 {total.get('p95', float('nan')):.1f} ms"
    if encode:
        text += f" (encode p50 {encode.get('p50', float('nan')):.1f} ms)"
    return text + (f", {row['n']} queries" if row.get("n") else "")


# --- parameters -------------------------------------------------------------------------------------------

def _notebook_path(name: str, notebooks_dir: Path) -> Path:
    path = notebooks_dir / f"{name}.ipynb"
    if not path.is_file():
        raise DemoError(f"{path} is missing: `cnclip-kd demo` runs the notebooks of a checkout of the kit "
                        f"(pip install -e . in it), or pass --notebooks DIR")
    return path


def _resolve_name(ref: str) -> str:
    """``"02"``, ``"02_distill"`` or ``"02_distill.ipynb"`` → ``"02_distill"``."""
    stem = ref.removesuffix(".ipynb")
    matches = [n for n in NOTEBOOKS if n == stem or n.split("_", 1)[0] == stem]
    if len(matches) != 1:
        raise DemoError(f"unknown notebook {ref!r}; use one of {', '.join(NOTEBOOKS)} (or its number, e.g. 02)")
    return matches[0]


def _known_parameters(path: Path) -> dict:
    import papermill

    return papermill.inspect_notebook(str(path))


def _coerce(text: str, kind: str, where: str) -> Any:
    """A command-line value as the parameter's declared type (``str``, ``int``, ``float``, ``bool``, ``list``,
    ``dict``)."""
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if kind in ("list", "dict"):
            value = json.loads(text)
            if not isinstance(value, list if kind == "list" else dict):
                raise ValueError(f"expected a JSON {kind}")
            return value
    except ValueError as err:
        raise DemoError(f"{where}={text!r}: not a valid {kind} ({err})") from None
    return text


def parse_overrides(items: list[str], notebooks_dir: str | os.PathLike | None = None) -> dict:
    """Parse ``-p`` options of ``cnclip-kd demo`` into per-notebook parameters.

    ``NOTEBOOK.NAME=VALUE`` sets one notebook's parameter (``NOTEBOOK``: ``02``, ``02_distill`` or the file
    name); a bare ``NAME=VALUE`` sets it in every notebook that has it.  ``VALUE`` is read as the parameter's
    declared type (``true``/``false`` for a bool, JSON for a list or dict, text as is for a str).

    Args:
        items: The option values, e.g. ``["02.MAX_EPOCHS=2", "THREADS=1"]``.
        notebooks_dir: Folder of the notebooks (default: the checkout's ``notebooks/``).

    Returns:
        Notebook stem → ``{NAME: value}``.

    Raises:
        DemoError: A malformed item, an unknown notebook or parameter, or a value of the wrong type.
    """
    notebooks_dir = Path(notebooks_dir) if notebooks_dir else NOTEBOOKS_DIR
    known = {name: _known_parameters(_notebook_path(name, notebooks_dir)) for name in NOTEBOOKS}
    out: dict[str, dict] = {}
    for item in items:
        target, eq, text = item.partition("=")
        if not eq or not target:
            raise DemoError(f"-p {item!r}: expected NOTEBOOK.NAME=VALUE (e.g. 02.MAX_EPOCHS=2) or NAME=VALUE")
        ref, dot, name = target.rpartition(".")
        names = [_resolve_name(ref)] if dot else [n for n in NOTEBOOKS if name in known[n]]
        if not names:
            raise DemoError(f"-p {item!r}: no notebook has a parameter {name!r}")
        for nb in names:
            if name not in known[nb]:
                raise DemoError(f"-p {item!r}: {nb}.ipynb has no parameter {name!r}; its parameters: "
                                f"{', '.join(known[nb])}")
            out.setdefault(nb, {})[name] = _coerce(text, known[nb][name]["inferred_type_name"], f"{nb}.{name}")
    return out


def notebook_literal(value: Any, where: str) -> Any:
    """``value`` as papermill writes a parameter literally (it would quote anything else as its ``str()``).

    Paths become text, tuples lists, numpy scalars their value.

    Raises:
        TypeError: A value a notebook cannot receive (the message starts with ``where``).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [notebook_literal(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): notebook_literal(v, where) for k, v in value.items()}
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # a numpy scalar
        return notebook_literal(value.item(), where)
    raise TypeError(f"{where}: {type(value).__name__} cannot be passed to a notebook; use numbers, strings, "
                    "booleans, lists or dicts")


def _parameters(preset: str, params: Mapping[str, Mapping[str, Any]] | None, out_dir: Path,
                notebooks_dir: Path) -> dict[str, dict]:
    """Every notebook's parameters: the preset's, then ``params``, then ``OUTPUT_DIR``; names checked."""
    if preset not in PRESETS:
        raise DemoError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    given: dict[str, dict] = {}
    for ref, values in (params or {}).items():
        given.setdefault(_resolve_name(ref), {}).update(values)
    result = {}
    for name in NOTEBOOKS:
        path = _notebook_path(name, notebooks_dir)
        values = {**PRESETS[preset].get(name, {}), **given.get(name, {})}
        if "OUTPUT_DIR" in values:
            raise DemoError(f"{name}.OUTPUT_DIR: the demo sets it to the output folder; pass --out instead")
        known = _known_parameters(path)
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise DemoError(f"{path}: unknown parameter(s) {unknown}; its parameters: {', '.join(known)}")
        if "OUTPUT_DIR" not in known:
            raise DemoError(f"{path}: its parameters cell has no OUTPUT_DIR, so the demo cannot point it at "
                            "the output folder")
        try:
            values = {k: notebook_literal(v, f"{name}.{k}") for k, v in values.items()}
        except TypeError as err:
            raise DemoError(str(err)) from None
        result[name] = {**values, "OUTPUT_DIR": str(out_dir)}
    return result


# --- the output folder and its state ----------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _load_state(out_dir: Path, preset: str) -> dict | None:
    """The folder's demo state; ``None`` for a new or empty folder. Refuses anything else."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DemoError(f"{out_dir} is a file, not a folder; pass another --out")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return None
    state_path = out_dir / STATE_FILE
    if not state_path.is_file():
        entries = sorted(p.name for p in out_dir.iterdir())
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise DemoError(f"{out_dir} already holds something that is not a `cnclip-kd demo` output (no "
                        f"{STATE_FILE}; it holds {shown}); nothing was changed. Pass --out with a new or empty "
                        "folder, e.g. --out out-demo")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DemoError(f"{state_path} cannot be read ({err}); nothing was changed. Delete {out_dir} to start "
                        "over, or pass another --out") from None
    if not isinstance(state, dict) or state.get("kind") != _STATE_KIND or not isinstance(state.get("notebooks"), dict):
        raise DemoError(f"{state_path} is not a `cnclip-kd demo` state file; nothing was changed. Pass another "
                        "--out")
    if state.get("preset") != preset:
        raise DemoError(f"{out_dir} holds a demo run with preset {state.get('preset')!r}, not {preset!r}; its "
                        f"trained runs would be continued with other settings. Pass --preset "
                        f"{state.get('preset')} to continue it, or another --out")
    return state


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder for the run (POSIX; elsewhere nothing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(out_dir / _LOCK_FILE, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DemoError(f"another `cnclip-kd demo` is running in {out_dir}; wait for it or pass another "
                            "--out") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _key(notebook: Path, parameters: Mapping, upstream: str) -> str:
    """What a notebook's outputs depend on: its file's content, its parameters, the notebook before it."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(notebook.read_bytes()).hexdigest().encode())
    h.update(json.dumps(parameters, sort_keys=True, ensure_ascii=False).encode())
    h.update(upstream.encode())
    return h.hexdigest()


def _paths_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if os.path.isabs(value):
            yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _paths_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from _paths_in(v)


def _missing_outputs(records: Mapping, out_dir: Path) -> list[str]:
    """Recorded paths inside ``out_dir`` that no longer exist."""
    missing = []
    for text in _paths_in(records):
        path = Path(text)
        try:
            path.resolve().relative_to(out_dir)
        except (ValueError, OSError):
            continue
        if not path.exists() and text not in missing:
            missing.append(text)
    return missing


def _up_to_date(entry: Mapping | None, key: str, executed: Path, out_dir: Path) -> tuple[dict | None, str]:
    """A skippable notebook's recorded results, or ``None`` and why it runs (for the progress line)."""
    if not entry:
        return None, ""
    if entry.get("key") != key:
        return None, "inputs changed"
    if entry.get("status") != "done":
        return None, {"failed": "failed last time", "running": "interrupted last time"}.get(entry.get("status"),
                                                                                            "not finished")
    try:
        records = read_records(executed)
    except (OSError, ValueError) as err:
        return None, f"executed copy unreadable ({type(err).__name__})"
    if not records:
        return None, "no recorded results in the executed copy"
    missing = _missing_outputs(records, out_dir)
    if missing:
        return None, f"{len(missing)} output(s) missing, e.g. {missing[0]}"
    return records, ""


# --- running a notebook -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _kernel_environment() -> Iterator[None]:
    """Environment the kernel inherits: this checkout's package first on ``PYTHONPATH``; restored after."""
    root = str(Path(__file__).resolve().parents[2])
    names = ("PYTHONPATH", "PYDEVD_DISABLE_FILE_VALIDATION")
    saved = {n: os.environ.get(n) for n in names}
    rest = [p for p in (saved["PYTHONPATH"] or "").split(os.pathsep) if p and p != root]
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *rest])
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # the kernel's debugger warning, to stderr
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _source_cell(err_index: int, notebook: Path) -> tuple[int | None, str]:
    """The source notebook's cell index for a cell of the executed copy (papermill inserted its
    ``injected-parameters`` cell after the ``parameters`` cell), and that cell's first line."""
    import nbformat

    cells = nbformat.read(str(notebook), as_version=4).cells
    tags = [c.get("metadata", {}).get("tags", []) for c in cells]
    param = next((i for i, t in enumerate(tags) if "parameters" in t), -1)
    injected = param + 1
    if err_index == injected:
        return None, ""
    index = err_index - 1 if err_index > injected else err_index
    source = cells[index].source if 0 <= index < len(cells) else ""
    first = next((line for line in source.splitlines() if line.strip()), "")
    return index, first


def _failure(name: str, notebook: Path, executed: Path, err: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    hint = (f"Fix it and run the same `cnclip-kd demo` again: finished notebooks are skipped. The executed copy, "
            f"with its outputs up to there: {executed}")
    if isinstance(err, PapermillExecutionError):
        index, first = _source_cell(err.cell_index, notebook)
        where = ("the injected parameters cell (a parameter value is not valid Python)" if index is None else
                 f"cell {index} (0-based, markdown cells counted; In [{err.exec_count}]): {first}")
        evalue = str(err.evalue).strip()
        if len(evalue) > 1500:
            evalue = evalue[:1500] + " ..."
        return f"notebook {name}.ipynb failed in {where}\n  {err.ename}: {evalue}\n{hint}"
    kind = type(err).__name__
    if kind == "CellTimeoutError":
        what = f"a cell ran past the time limit ({err})"
    elif kind == "DeadKernelError":
        what = f"the kernel died, out of memory? ({err})"
    elif kind == "NoSuchKernel":
        what = (f"no Jupyter kernel {KERNEL_NAME!r}: pip install ipykernel (or python -m ipykernel install "
                "--user)")
    else:
        what = f"{kind}: {err}"
    return f"notebook {name}.ipynb did not run: {what}\n{hint}"


def _execute(name: str, notebook: Path, executed: Path, parameters: Mapping, out_dir: Path,
             timeout: float | None) -> None:
    import papermill
    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    failure = None
    with _kernel_environment():
        try:
            papermill.execute_notebook(str(notebook), str(executed), parameters=dict(parameters),
                                       kernel_name=KERNEL_NAME, cwd=str(out_dir), progress_bar=False,
                                       log_output=False, execution_timeout=timeout, start_timeout=120,
                                       # The kernel's own log goes to our stderr (a TCP warning at start, an
                                       # interrupt at shutdown); cell errors come back through papermill.
                                       extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
        except (PapermillExecutionError, CellTimeoutError, DeadKernelError, NoSuchKernel, RuntimeError) as err:
            failure = _failure(name, notebook, executed, err)
    if failure:
        # Raised outside the except block: the caller gets one clear message, not papermill's chain.
        raise DemoError(failure)


# --- the summary ------------------------------------------------------------------------------------------

def _row_for(rows: Any, backend: str | None) -> dict | None:
    """The latency row of ``backend`` (notebook 06 labels an int8 row with its method: ``onnx-int8 (static)``)."""
    rows = [r for r in rows or [] if isinstance(r, dict) and isinstance(r.get("backend"), str)]
    return (next((r for r in rows if r["backend"] == backend), None)
            or next((r for r in rows if backend and r["backend"].startswith(f"{backend} (")), None))


def _summary(out_dir: Path, preset: str, runs: list[NotebookRun], records: Mapping[str, dict],
             total_s: float) -> DemoSummary:
    r02, r04, r06 = (records.get(n, {}) for n in ("02_distill", "04_visualize_top10", "06_deploy_cpu"))
    return DemoSummary(
        out_dir=str(out_dir), preset=preset, total_s=round(total_s, 1), notebooks=runs,
        comparison=list(r02.get("comparison") or []), curves=r02.get("curves"),
        top10_figures=dict(r04.get("figures") or {}), text_top10_figures=dict(r04.get("text_figures") or {}),
        text_query=r04.get("text_query") or "",
        deploy_figures=[p for p in (r06.get("figure"), r06.get("text_figure")) if p],
        encoder=r06.get("encoder"), backend=r06.get("backend"),
        text_encoder=r06.get("text_encoder"), text_backend=r06.get("text_backend"),
        latency=_row_for(r06.get("latency"), r06.get("backend")),
        text_latency=_row_for(r06.get("text_latency"), r06.get("text_backend")),
        plan=(r06.get("plan") or {}).get("choice") if isinstance(r06.get("plan"), dict) else None,
        plan_budget_ms=(r06.get("plan") or {}).get("budget_ms") if isinstance(r06.get("plan"), dict) else None,
    )


# --- the run ----------------------------------------------------------------------------------------------

def run_demo(out: str | os.PathLike = "out", preset: str = "demo",
             params: Mapping[str, Mapping[str, Any]] | None = None, *,
             notebooks_dir: str | os.PathLike | None = None, timeout: float | None = None,
             progress: Callable[[str], None] | None = None) -> DemoSummary:
    """Run notebooks 01–06 in order into one output folder; skip those already complete.

    Args:
        out: The output folder (every notebook's ``OUTPUT_DIR``). Created if missing; an existing folder must be
            empty or an earlier demo output of the same preset.
        preset: A key of :data:`PRESETS`: ``"demo"`` (the notebooks' own defaults) or ``"tiny"`` (a quick smoke
            test).
        params: Extra parameters per notebook, ``{"02_distill": {"MAX_EPOCHS": 5}}`` (a notebook may also be
            named by its number, ``"02"``); they win over the preset's.
        notebooks_dir: Folder holding the notebooks (default: the checkout's ``notebooks/``).
        timeout: Seconds one cell may run (default: no limit).
        progress: Called with one line per event (a notebook starting, finishing or skipped); default: log it.

    Returns:
        The :class:`DemoSummary`, also written to ``OUT/demo-summary.json``.

    Raises:
        DemoError: ``out`` holds something else, a parameter is unknown, or a notebook failed (the message names
            it, the cell, the error and the executed copy).
    """
    started = time.monotonic()
    say = progress or logger.info
    out_dir = Path(out).expanduser().resolve()
    notebooks_dir = Path(notebooks_dir).resolve() if notebooks_dir else NOTEBOOKS_DIR
    parameters = _parameters(preset, params, out_dir, notebooks_dir)  # checked before anything is written
    state = _load_state(out_dir, preset)
    state_path = out_dir / STATE_FILE
    if state is None:
        state = {"kind": _STATE_KIND, "version": _STATE_VERSION, "preset": preset, "created": _now(),
                 "notebooks": {}}
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(state_path, state)  # the marker first: an interrupted first run is still ours

    runs: list[NotebookRun] = []
    records: dict[str, dict] = {}
    upstream = ""
    with _locked(out_dir):
        for i, name in enumerate(NOTEBOOKS, 1):
            notebook = notebooks_dir / f"{name}.ipynb"
            executed = out_dir / EXECUTED_DIR / f"{name}.ipynb"
            values = dict(parameters[name])
            for param, (source, field_name) in FROM_RECORDS.get(name, {}).items():
                if param not in values and records.get(source, {}).get(field_name):
                    values[param] = records[source][field_name]
            key = _key(notebook, values, upstream)
            upstream = key
            entry = state["notebooks"].get(name)
            tag = f"[{i}/{len(NOTEBOOKS)}] {name}"
            recorded, why = _up_to_date(entry, key, executed, out_dir)
            if recorded is not None:
                say(f"{tag}: skipped, up to date (ran {entry.get('finished', '?')} in {entry['elapsed_s']:.1f} s)")
                runs.append(NotebookRun(name, "skipped", entry["elapsed_s"], str(executed), values))
                records[name] = recorded
                continue
            say(f"{tag}: running" + (f" ({why})" if why else "") + " ...")
            executed.parent.mkdir(parents=True, exist_ok=True)
            state["notebooks"][name] = {"key": key, "status": "running", "parameters": values,
                                        "executed": str(executed.relative_to(out_dir)), "started": _now()}
            atomic_write_json(state_path, state)
            t0 = time.monotonic()
            try:
                _execute(name, notebook, executed, values, out_dir, timeout)
            except DemoError as err:
                elapsed = time.monotonic() - t0
                state["notebooks"][name].update(status="failed", finished=_now(), elapsed_s=round(elapsed, 1),
                                                error=str(err))
                atomic_write_json(state_path, state)
                say(f"{tag}: FAILED after {elapsed:.1f} s")
                raise
            elapsed = time.monotonic() - t0
            records[name] = read_records(executed)
            state["notebooks"][name].update(status="done", finished=_now(), elapsed_s=round(elapsed, 1))
            atomic_write_json(state_path, state)
            say(f"{tag}: done in {elapsed:.1f} s")
            runs.append(NotebookRun(name, "ran", round(elapsed, 1), str(executed), values))

    summary = _summary(out_dir, preset, runs, records, time.monotonic() - started)
    atomic_write_json(out_dir / SUMMARY_FILE, summary.to_dict())
    say(f"all {len(NOTEBOOKS)} notebooks finished in {summary.total_s:.1f} s")
    return summary
