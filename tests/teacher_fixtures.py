"""Tiny ModelScope teacher directories, built from the real model classes and file layout.

Each ``make_*`` function writes one teacher directory at ``path`` and returns it:

- :func:`make_tiny_clip_teacher_dir`: ``CLIPForMultiModalEmbedding`` layout, weights
  from modelscope's own ``clip.model.CLIP`` at a tiny size (32 px, width 64).
- :func:`make_tiny_rleg_teacher_dir`: ``RLEGForMultiModalEmbedding`` layout, weights
  from modelscope's ``RLEGModel`` with a tiny ``encoder_config`` and BPE file.
- :func:`make_team_teacher_dir`: ``TEAMForMultiModalSimilarity`` layout at full
  size (its ViT-L/14 image tower is hard-coded; the BERT text tower is cut to one
  layer), random weights.

Module-scoped fixtures wrap them so a test module builds each directory once.
Other test modules may import the ``make_*`` functions directly.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from torch import nn

#: Tiny cn_clip-format configs (same keys as cn_clip's model_configs JSONs).
TINY_VISION = {"embed_dim": 32, "image_resolution": 32, "vision_layers": 2,
               "vision_width": 64, "vision_patch_size": 8}
TINY_TEXT = {"vocab_size": 21128, "text_attention_probs_dropout_prob": 0.1,
             "text_hidden_act": "gelu", "text_hidden_dropout_prob": 0.1,
             "text_hidden_size": 32, "text_initializer_range": 0.02,
             "text_intermediate_size": 64, "text_max_position_embeddings": 64,
             "text_num_attention_heads": 2, "text_num_hidden_layers": 1,
             "text_type_vocab_size": 2}
#: RLEG encoder_config list: [embed_dim, img_res, v_layers, v_width, patch,
#: ctx_len, vocab, t_width, t_heads, t_layers].
TINY_RLEG = [24, 32, 2, 64, 8, 16, 600, 32, 2, 1]


def _cnclip_vocab() -> Path:
    import cn_clip.clip

    return Path(cn_clip.clip.__file__).resolve().parent / "vocab.txt"


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def _configuration(task: str, model_type: str) -> dict:
    return {"framework": "pytorch", "task": task, "model": {"type": model_type},
            "pipeline": {"type": task}}


def make_tiny_clip_teacher_dir(path, seed: int = 0) -> Path:
    """Write a tiny ModelScope CLIP teacher dir (CLIPForMultiModalEmbedding layout)."""
    from modelscope.models.multi_modal.clip.bert_tokenizer import FullTokenizer
    from modelscope.models.multi_modal.clip.model import CLIP

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "configuration.json",
                _configuration("multi-modal-embedding", "clip-multi-modal-embedding"))
    _write_json(path / "vision_model_config.json", TINY_VISION)
    _write_json(path / "text_model_config.json", TINY_TEXT)
    (path / "vocab.txt").write_bytes(_cnclip_vocab().read_bytes())
    torch.manual_seed(seed)
    model = CLIP(**TINY_VISION, **TINY_TEXT,
                 tokenizer=FullTokenizer(vocab_file=str(path / "vocab.txt")))
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def _write_tiny_bpe(path: Path) -> None:
    """A BPE merges file in the real format (header line, then 'a b' merges), gzipped."""
    merges = ["#version: 0.2", "t h", "th e</w>", "a n", "i n", "o n</w>", "e r"]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(merges) + "\n")


def make_tiny_rleg_teacher_dir(path, seed: int = 0) -> Path:
    """Write a tiny ModelScope RLEG teacher dir (RLEGForMultiModalEmbedding layout)."""
    from modelscope.models.multi_modal.rleg.model import RLEGModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "configuration.json",
                _configuration("generative-multi-modal-embedding", "rleg-generative-multi-modal"))
    _write_json(path / "encoder_config.json", {"tiny-rleg": TINY_RLEG})
    _write_tiny_bpe(path / "bpe_vocab_16e6.txt.gz")
    torch.manual_seed(seed)
    model = RLEGModel(model_dir=str(path))
    # RLEG leaves these as torch.empty; give them values so the file is deterministic.
    nn.init.normal_(model.text_encoder.positional_embedding, std=0.01)
    nn.init.normal_(model.text_encoder.text_projection, std=0.01)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def make_team_teacher_dir(path, seed: int = 0) -> Path:
    """Write a TEAM teacher dir: full ViT-L/14 image tower, 1-layer BERT, random weights.

    The state dict holds exactly TEAM's keys (built from TEAM's own component classes)
    plus ``text_model.bert.embeddings.position_ids``, which TEAM deletes on load.
    Saved in fp16 to halve the file (TEAM copies it into its fp32 parameters).
    """
    from modelscope.models.multi_modal.team.utils import (BertWrapper, CLIPVisionWrapper,
                                                           CrossLayer)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "configuration.json",
                _configuration("multi-modal-similarity", "team-multi-modal-similarity"))
    bert = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768,
            "num_hidden_layers": 1, "num_attention_heads": 12, "intermediate_size": 256,
            "max_position_embeddings": 32, "vocab_size": 21128, "type_vocab_size": 2,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
            "layer_norm_eps": 1e-12, "pad_token_id": 0}
    _write_json(path / "text_config.json", bert)
    (path / "vocab.txt").write_bytes(_cnclip_vocab().read_bytes())
    torch.manual_seed(seed)
    # Same attribute names as modelscope's TEAM module, so the keys match exactly.
    team = nn.Module()
    team.text_model = BertWrapper(config_json=str(path / "text_config.json"), feat_dim=768,
                                  token_dim=1024)
    team.text_model.bert.cls = None
    team.image_model = CLIPVisionWrapper()
    team.cross_model = nn.ModuleList([CrossLayer(feat_dim=1024, mlp_ratio=2)])
    team.image_tensor_fc = nn.Linear(1024, 768)
    team.text_tensor_fc = nn.Linear(1024, 768)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in team.state_dict().items()}
    sd["text_model.bert.embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    torch.save(sd, path / "pytorch_model.bin")
    return path


def tiny_cnclip_config_files(path) -> tuple[Path, Path]:
    """Write the tiny vision/text configs as JSON files (for the cn_clip checkpoint paths)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vision, text = path / "tiny-vision.json", path / "tiny-text.json"
    _write_json(vision, TINY_VISION)
    _write_json(text, TINY_TEXT)
    return vision, text


def make_tiny_cnclip_model(seed: int = 0):
    """A tiny cn_clip ``CLIP`` (cn_clip's own class) in float32 eval mode."""
    from cn_clip.clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**TINY_VISION, **TINY_TEXT).float().eval()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip_teacher_dir(tmp_path_factory.mktemp("tiny-clip") / "teacher")


@pytest.fixture(scope="module")
def tiny_rleg_dir(tmp_path_factory) -> Path:
    return make_tiny_rleg_teacher_dir(tmp_path_factory.mktemp("tiny-rleg") / "teacher")


@pytest.fixture(scope="module")
def team_dir(tmp_path_factory) -> Path:
    return make_team_teacher_dir(tmp_path_factory.mktemp("team") / "teacher")
