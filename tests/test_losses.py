"""Tests for cnclip_kd.distill.losses: values, gradients, and DDP equivalence."""

import hashlib
import math
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from cnclip_kd.distill.losses import (KD_LOSSES, ClipLoss, CosineKDLoss, DistillationLoss, FeatureKDLoss,
    RelationKDLoss, build_kd_loss, gather_features)
from cnclip_kd.distill.pairs import title_key


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _orthogonal(n, seed=0):
    q, _ = torch.linalg.qr(_randn(n, n, seed=seed).double())
    return q.float()


# ---------------------------------------------------------------- cosine KD


@pytest.mark.parametrize("student_dim,teacher_dim", [(512, 512), (512, 768), (512, 1024), (768, 512)])
def test_cosine_kd_matches_upstream(student_dim, teacher_dim):
    from cn_clip.training.train import cosineSimilarityLoss

    student = F.normalize(_randn(8, student_dim, seed=1), dim=-1)
    teacher = _randn(8, teacher_dim, seed=2) * 3  # teachers are not normalised
    out = CosineKDLoss()(student, teacher)
    assert set(out) == {"kd_cosine"}
    expected = cosineSimilarityLoss(teacher, student)
    assert out["kd_cosine"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert 0.5 < out["kd_cosine"].item() < 1.5  # unrelated features: cosine ~ 0


def test_cosine_kd_zero_for_same_direction():
    teacher = _randn(4, 16, seed=3)
    assert CosineKDLoss()(teacher * 0.2, teacher)["kd_cosine"].item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- contrastive


def test_clip_loss_matches_hand_computed_cross_entropy():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 2.0]])
    txt = torch.tensor([[2.0, 1.0], [1.0, 1.0], [-1.0, 3.0]])  # normalised inside
    scale = 2.0

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    iu, tu = [unit(v) for v in img.tolist()], [unit(v) for v in txt.tolist()]
    logits = [[scale * sum(a * b for a, b in zip(i, t)) for t in tu] for i in iu]

    def ce(rows):
        return sum(math.log(sum(math.exp(x) for x in row)) - row[k] for k, row in enumerate(rows)) / len(rows)

    i2t, t2i = ce(logits), ce([list(col) for col in zip(*logits)])
    assert abs(i2t - t2i) > 0.02  # the example tells the two directions apart
    expected = (i2t + t2i) / 2
    out = ClipLoss()(img, txt, torch.tensor(scale))
    assert set(out) == {"contrastive"}
    assert out["contrastive"].item() == pytest.approx(expected, abs=1e-6)
    # A plain float scale and a per-replica vector (averaged, as upstream) agree.
    assert ClipLoss()(img, txt, scale)["contrastive"].item() == pytest.approx(expected, abs=1e-6)
    vec = torch.tensor([1.0, 3.0])
    assert ClipLoss()(img, txt, vec)["contrastive"].item() == pytest.approx(expected, abs=1e-6)


def test_clip_loss_near_zero_when_aligned():
    feats = torch.eye(4)
    loss = ClipLoss()(feats, feats.clone(), torch.tensor(100.0))["contrastive"]
    assert loss.item() < 1e-6
    # A shuffled pairing is expensive at that scale.
    assert ClipLoss()(feats, feats.flip(0), torch.tensor(100.0))["contrastive"].item() > 50


def test_clip_loss_gradient_reaches_both_inputs_and_scale():
    img = _randn(6, 8, seed=4).requires_grad_()
    txt = _randn(6, 8, seed=5).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    ClipLoss()(img, txt, scale)["contrastive"].backward()
    for g in (img.grad, txt.grad, scale.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_losses_run_in_float32_under_bf16_and_autocast():
    img, txt = _randn(16, 32, seed=6), _randn(16, 32, seed=7)
    teacher = _randn(16, 48, seed=8)
    img_b, txt_b, teacher_b = img.bfloat16(), txt.bfloat16(), teacher.bfloat16()
    ref_loss = DistillationLoss(RelationKDLoss())
    ref = ref_loss(img_b.float(), txt_b.float(), torch.tensor(50.0), teacher_b.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ref_loss(img_b, txt_b, torch.tensor(50.0), teacher_b)
    for key in ref:
        assert out[key].dtype == torch.float32
        # bf16 matmuls would be off by ~1e-2 here.
        assert out[key].item() == pytest.approx(ref[key].item(), abs=1e-5)


# ---------------------------------------------------------------- feature KD


def test_feature_kd_zero_when_projector_maps_onto_teacher():
    loss_fn = FeatureKDLoss(4, 6)
    weight = _randn(6, 4, seed=9)
    with torch.no_grad():
        loss_fn.proj.weight.copy_(weight)
    student = _randn(5, 4, seed=10)
    teacher = (student @ weight.t()) * 2.5  # same direction, other norm
    assert loss_fn(student, teacher)["kd_feature"].item() == pytest.approx(0.0, abs=1e-6)
    # Opposite direction is the maximum: |u - (-u)|^2 = 4.
    assert loss_fn(student, -teacher)["kd_feature"].item() == pytest.approx(4.0, abs=1e-5)


def test_feature_kd_value_shapes_and_trainable_projector():
    loss_fn = FeatureKDLoss(512, 1024)
    params = list(loss_fn.parameters())
    assert len(params) == 1 and params[0].requires_grad
    assert tuple(params[0].shape) == (1024, 512)
    assert list(loss_fn.state_dict()) == ["proj.weight"]

    student, teacher = _randn(8, 512, seed=11), _randn(8, 1024, seed=12)
    out = loss_fn(student, teacher)["kd_feature"]
    assert out.dim() == 0
    p = F.normalize(student @ loss_fn.proj.weight.detach().t(), dim=-1)
    t = F.normalize(teacher, dim=-1)
    expected = ((p - t) ** 2).sum(dim=1).mean()
    assert out.item() == pytest.approx(expected.item(), abs=1e-6)
    assert out.item() == pytest.approx(2 * (1 - (p * t).sum(1).mean().item()), abs=1e-5)
    out.backward()
    assert loss_fn.proj.weight.grad.shape == (1024, 512)
    assert loss_fn.proj.weight.grad.abs().sum() > 0


def test_feature_kd_half_module_still_float32():
    loss_fn = FeatureKDLoss(16, 24).half()
    out = loss_fn(_randn(4, 16, seed=13).half(), _randn(4, 24, seed=14).half())["kd_feature"]
    assert out.dtype == torch.float32 and torch.isfinite(out)


# ---------------------------------------------------------------- relation KD


def test_relation_kd_zero_for_identical_and_rotated_scaled_features():
    teacher = _randn(10, 8, seed=15)
    loss_fn = RelationKDLoss()
    assert loss_fn.temperature == 0.1
    assert loss_fn(teacher.clone(), teacher)["kd_relation"].item() == pytest.approx(0.0, abs=1e-6)
    # Orthogonal map into a wider space (orthonormal rows) and a scale keep all cosines.
    q = _orthogonal(12, seed=16)[:8]
    student = teacher @ q * 3.7
    assert student.shape == (10, 12)
    assert loss_fn(student, teacher)["kd_relation"].item() == pytest.approx(0.0, abs=1e-5)


def test_relation_kd_matches_manual_kl_and_is_positive():
    student, teacher = _randn(5, 6, seed=17), _randn(5, 9, seed=18)
    tau = 0.5
    out = RelationKDLoss(temperature=tau)(student, teacher)["kd_relation"].item()

    def rows(x):
        x = F.normalize(x.double(), dim=-1)
        sim = (x @ x.t()).tolist()
        result = []
        for i, row in enumerate(sim):
            vals = [v / tau for j, v in enumerate(row) if j != i]  # diagonal dropped
            z = sum(math.exp(v) for v in vals)
            result.append([math.exp(v) / z for v in vals])
        return result

    ps, pt = rows(student), rows(teacher)
    expected = sum(sum(b * math.log(b / a) for a, b in zip(rs, rt)) for rs, rt in zip(ps, pt)) / len(ps)
    assert out > 1e-3
    assert out == pytest.approx(expected, abs=1e-6)


def test_relation_kd_single_sample_is_zero_and_bad_temperature_rejected():
    x = _randn(1, 4, seed=19).requires_grad_()
    out = RelationKDLoss()(x, _randn(1, 6, seed=20))["kd_relation"]
    assert out.item() == 0.0
    out.backward()  # still part of the graph
    with pytest.raises(ValueError, match="temperature"):
        RelationKDLoss(temperature=0.0)


# ---------------------------------------------------------------- registry / total


def test_build_kd_loss_and_unknown_name():
    assert set(KD_LOSSES) == {"cosine", "feature", "relation"}
    assert isinstance(build_kd_loss("cosine", 512, 768), CosineKDLoss)
    assert isinstance(build_kd_loss("relation", 512, 768), RelationKDLoss)
    feat = build_kd_loss("feature", 512, 768)
    assert isinstance(feat, FeatureKDLoss) and feat.proj.weight.shape == (768, 512)
    with pytest.raises(ValueError, match="cosine, feature, relation") as err:
        build_kd_loss("l2", 512, 768)
    assert "'l2'" in str(err.value)


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_distillation_total_is_contrastive_plus_weighted_kd(name):
    img, txt, teacher = _randn(6, 16, seed=21), _randn(6, 16, seed=22), _randn(6, 24, seed=23)
    kd = build_kd_loss(name, 16, 24)
    scale = torch.tensor(20.0)
    for weight in (0.5, 2.0):
        out = DistillationLoss(kd, kd_loss_weight=weight)(img, txt, scale, teacher)
        assert set(out) == {"contrastive", f"kd_{name}", "total"}
        assert out["contrastive"].item() == pytest.approx(ClipLoss()(img, txt, scale)["contrastive"].item(), abs=1e-6)
        assert out[f"kd_{name}"].item() == pytest.approx(kd(img, teacher)[f"kd_{name}"].item(), abs=1e-6)
        assert out[f"kd_{name}"].item() > 0
        expected = out["contrastive"].item() + weight * out[f"kd_{name}"].item()
        assert out["total"].item() == pytest.approx(expected, abs=1e-6)
    assert DistillationLoss(kd).kd_loss_weight == 0.5


def test_distillation_without_kd_and_missing_teacher():
    img, txt = _randn(6, 16, seed=24), _randn(6, 16, seed=25)
    out = DistillationLoss()(img, txt, torch.tensor(20.0), teacher_features=_randn(6, 24, seed=26))
    assert set(out) == {"contrastive", "total"}
    assert out["total"].item() == out["contrastive"].item()
    with pytest.raises(ValueError, match="teacher_features"):
        DistillationLoss(CosineKDLoss())(img, txt, torch.tensor(20.0))


def test_gather_features_is_identity_without_distributed():
    t = _randn(3, 4, seed=27)
    assert gather_features(t, with_grad=True) is t
    assert gather_features(t, with_grad=False) is t


# ---------------------------------------------------------------- title positives


def test_distinct_title_keys_give_the_plain_clip_loss_bit_for_bit():
    img, txt, scale = _randn(6, 16, seed=40), _randn(6, 16, seed=41), torch.tensor(30.0)
    # Keys that float32 would merge (2**62, 2**62 + 1): they must stay distinct int64 keys.
    keys = torch.tensor([2 ** 62, 2 ** 62 + 1, -2 ** 63, 2 ** 63 - 1, 0, -7], dtype=torch.long)
    plain = ClipLoss()(img, txt, scale)["contrastive"]
    assert torch.equal(ClipLoss()(img, txt, scale, title_keys=keys)["contrastive"], plain)
    kd = RelationKDLoss()
    teacher = _randn(6, 24, seed=42)
    without = DistillationLoss(kd)(img, txt, scale, teacher)
    with_keys = DistillationLoss(kd)(img, txt, scale, teacher, title_keys=keys)
    assert set(with_keys) == set(without)
    for key in without:
        assert torch.equal(with_keys[key], without[key]), key
    assert torch.equal(with_keys["contrastive"], plain)


def _title_example():
    img = torch.tensor([[1.0, 0.0, 0.5], [0.2, 1.0, 0.0], [0.7, 0.3, 0.9], [-0.4, 0.6, 1.0]])
    txt = torch.tensor([[0.9, 0.1, 0.4], [0.0, 1.0, -0.3], [1.0, 0.5, 0.6], [-0.2, 0.2, 1.0]])
    keys = torch.tensor([10, 20, 10, 30])  # samples 0 and 2 share a title
    return img, txt, keys


def test_repeated_title_keys_give_the_hand_computed_soft_target_loss():
    img, txt, keys = _title_example()
    scale = 5.0
    logits = scale * F.normalize(img.double(), dim=-1) @ F.normalize(txt.double(), dim=-1).t()
    # Image/text 0 and 2 have two positives each (weight 1/2), 1 and 3 only their own pair.
    target = torch.tensor([[0.5, 0.0, 0.5, 0.0],
                           [0.0, 1.0, 0.0, 0.0],
                           [0.5, 0.0, 0.5, 0.0],
                           [0.0, 0.0, 0.0, 1.0]], dtype=torch.double)
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    t2i = -(target * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    expected = ((i2t + t2i) / 2).item()

    got = ClipLoss()(img, txt, torch.tensor(scale), title_keys=keys)["contrastive"]
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, abs=1e-6)
    plain = ClipLoss()(img, txt, torch.tensor(scale))["contrastive"].item()
    assert abs(plain - expected) > 1e-2  # the example tells soft from hard targets apart
    out = DistillationLoss()(img, txt, scale, title_keys=keys)
    assert out["contrastive"].item() == pytest.approx(expected, abs=1e-6)


def test_title_positives_gradient_is_finite_and_reaches_all_inputs():
    img = _randn(6, 8, seed=43).requires_grad_()
    txt = _randn(6, 8, seed=44).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    for keys in (torch.tensor([1, 2, 1, 3, 2, 1]), torch.zeros(6, dtype=torch.long)):  # all equal too
        img.grad = txt.grad = scale.grad = None
        loss = ClipLoss()(img, txt, scale, title_keys=keys)["contrastive"]
        assert torch.isfinite(loss)
        loss.backward()
        for g in (img.grad, txt.grad, scale.grad):
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_title_keys_of_the_wrong_shape_are_rejected():
    img, txt, _ = _title_example()
    with pytest.raises(ValueError, match="title_keys"):
        ClipLoss()(img, txt, 5.0, title_keys=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="title_keys"):
        DistillationLoss()(img, txt, 5.0, title_keys=torch.zeros(4, 1, dtype=torch.long))


# ---------------------------------------------------------------- contrastive weight / extra KD images


def test_contrastive_weight_scales_only_the_contrastive_term():
    img = _randn(6, 16, seed=45).requires_grad_()
    txt = _randn(6, 16, seed=46).requires_grad_()
    teacher, scale = _randn(6, 24, seed=47), torch.tensor(20.0)
    kd = RelationKDLoss()
    ref = DistillationLoss(kd, kd_loss_weight=0.5)(img, txt, scale, teacher)
    assert DistillationLoss(kd).contrastive_weight == 1.0
    for weight in (0.0, 0.3, 2.0):
        out = DistillationLoss(kd, kd_loss_weight=0.5, contrastive_weight=weight)(img, txt, scale, teacher)
        assert torch.equal(out["contrastive"], ref["contrastive"])  # reported unweighted
        assert torch.equal(out["kd_relation"], ref["kd_relation"])
        expected = weight * ref["contrastive"].item() + 0.5 * ref["kd_relation"].item()
        assert out["total"].item() == pytest.approx(expected, abs=1e-6)
    # Weight 0: KD only; the text features get a zero gradient (still in the graph, as DDP needs).
    DistillationLoss(kd, contrastive_weight=0.0)(img, txt, scale, teacher)["total"].backward()
    assert txt.grad is not None and not txt.grad.any()
    assert img.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="contrastive_weight"):
        DistillationLoss(kd, contrastive_weight=-0.1)


@pytest.mark.parametrize("name", ["feature", "relation"])
def test_extra_images_enter_only_the_kd_term(name):
    img, txt, teacher = _randn(5, 16, seed=48), _randn(5, 16, seed=49), _randn(5, 24, seed=50)
    extra_img, extra_teacher = _randn(3, 16, seed=51), _randn(3, 24, seed=52)
    kd, scale = build_kd_loss(name, 16, 24), torch.tensor(20.0)
    loss_fn = DistillationLoss(kd, kd_loss_weight=0.7)
    plain = loss_fn(img, txt, scale, teacher)
    out = loss_fn(img, txt, scale, teacher, extra_image_features=extra_img, extra_teacher_features=extra_teacher)
    expected_kd = kd(torch.cat([img, extra_img]), torch.cat([teacher, extra_teacher]))[f"kd_{name}"]
    assert out[f"kd_{name}"].item() == pytest.approx(expected_kd.item(), abs=1e-6)
    assert abs(out[f"kd_{name}"].item() - plain[f"kd_{name}"].item()) > 1e-4  # the extras did count
    assert torch.equal(out["contrastive"], plain["contrastive"])
    assert out["total"].item() == pytest.approx(out["contrastive"].item() + 0.7 * expected_kd.item(), abs=1e-6)


def test_extra_images_must_come_in_pairs_and_need_a_kd_loss():
    img, txt, teacher = _randn(4, 16, seed=53), _randn(4, 16, seed=54), _randn(4, 24, seed=55)
    extra_img, extra_teacher = _randn(2, 16, seed=56), _randn(2, 24, seed=57)
    loss_fn = DistillationLoss(RelationKDLoss())
    with pytest.raises(ValueError, match="together"):
        loss_fn(img, txt, 20.0, teacher, extra_image_features=extra_img)
    with pytest.raises(ValueError, match="together"):
        loss_fn(img, txt, 20.0, teacher, extra_teacher_features=extra_teacher)
    with pytest.raises(ValueError, match="KD loss"):
        DistillationLoss()(img, txt, 20.0, extra_image_features=extra_img, extra_teacher_features=extra_teacher)


# ---------------------------------------------------------------- title keys


def test_title_key_normalises_whitespace_width_and_case():
    base = title_key("夏季新款 连衣裙")
    assert title_key("夏季新款  连衣裙 ") == base
    assert title_key("\t夏季新款\u3000连衣裙\n") == base  # full-width space (NFKC) and tabs
    assert title_key("ＡＢＣ连衣裙ｘｌ") == title_key("abc连衣裙XL")  # full-width letters (NFKC), case
    assert title_key("夏季新款 连衣裙 红") != base
    assert title_key("夏季新款连衣裙") != base  # only runs of whitespace collapse, not its presence
    assert -2 ** 63 <= base < 2 ** 63
    assert torch.tensor(base, dtype=torch.long).item() == base
    # blake2b (8 bytes, little-endian, signed) of the normalised UTF-8 title: pinned, not hash().
    digest = hashlib.blake2b("夏季新款 连衣裙".encode(), digest_size=8).digest()
    assert base == int.from_bytes(digest, "little", signed=True)


def test_title_key_is_stable_across_processes():
    titles = ["夏季新款 连衣裙", "ＡＢＣ shoes", "x"]
    code = ("import sys; from cnclip_kd.distill.pairs import title_key; "
            "print(*[title_key(t) for t in sys.stdin.read().split('|')])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a hash()-based key would change with this
    done = subprocess.run([sys.executable, "-c", code], input="|".join(titles), capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=300, check=True)
    assert [int(v) for v in done.stdout.split()] == [title_key(t) for t in titles]


# ---------------------------------------------------------------- DDP equivalence
#
# What is asserted, for every KD kind and for an even (4+4) and uneven (5+3)
# split of one fixed global batch of 8 over 2 gloo ranks:
#   1. every loss term on every rank equals the single-process value on the
#      whole batch (1e-5);
#   2. the gradient of a rank's loss w.r.t. its *local* image/text features
#      equals world_size * (single-process gradient)[that rank's rows]: each
#      rank computes the same global loss and the gather's backward sums the
#      ranks' gradients;
#   3. hence, after DDP averages parameter gradients over ranks, the student
#      encoder's parameters and logit_scale hold exactly the single-process
#      gradient (checked on every rank);
#   4. the FeatureKD projector, used only inside the loss and not wrapped in
#      DDP, gets the single-process gradient on every rank without averaging.

_DIN_IMG, _DIN_TXT, _D_S, _D_T, _N = 12, 10, 16, 24, 8


class _TinyStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = nn.Linear(_DIN_IMG, _D_S)
        self.text = nn.Linear(_DIN_TXT, _D_S)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, x_img, x_txt):
        return self.visual(x_img), self.text(x_txt), self.logit_scale.exp()


def _run_case(model, loss_fn, x_img, x_txt, teacher):
    img, txt, scale = model(x_img, x_txt)
    img.retain_grad()
    txt.retain_grad()
    out = loss_fn(img, txt, scale, teacher)
    out["total"].backward()
    inner = model.module if hasattr(model, "module") else model
    result = {
        "losses": {k: v.item() for k, v in out.items()},
        "img_grad": img.grad.clone(),
        "txt_grad": txt.grad.clone(),
        "param_grads": {k: p.grad.clone() for k, p in inner.named_parameters()},
    }
    if loss_fn.kd is not None:
        result["kd_grads"] = {k: p.grad.clone() for k, p in loss_fn.kd.named_parameters()}
    return result


def _ddp_worker(rank, world_size, init_file, data_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        data = torch.load(data_path)
        results = {}
        for split, extra_split in zip(data["splits"], data["extra_splits"]):
            start = sum(split[:rank])
            rows = slice(start, start + split[rank])
            for name in data["kinds"]:
                model = _TinyStudent()
                model.load_state_dict(data["model"])
                ddp = nn.parallel.DistributedDataParallel(model)
                kd = build_kd_loss(name, _D_S, _D_T)
                kd.load_state_dict(data["kd"][name])
                results[(tuple(split), name)] = _run_case(
                    ddp, DistillationLoss(kd), data["x_img"][rows], data["x_txt"][rows], data["teacher"][rows]
                )
            # ClipLoss on its own gathers too.
            img = data["clip_img"][rows].clone().requires_grad_()
            txt = data["clip_txt"][rows].clone().requires_grad_()
            loss = ClipLoss()(img, txt, torch.tensor(10.0))["contrastive"]
            loss.backward()
            results[(tuple(split), "clip")] = {"loss": loss.item(), "img_grad": img.grad, "txt_grad": txt.grad}
            erows = slice(sum(extra_split[:rank]), sum(extra_split[:rank + 1]))
            results[(tuple(split), "titles")] = _titles_case(data, rows, erows)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        # Both ranks are past their last collective before either closes its sockets (a peer closing while the
        # other may still read is the suspected cause of a rare gloo abort at exit, "terminate called without an
        # active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _titles_case(data, rows, erows):
    """Title keys (shared across ranks) and extra KD-only images (own, uneven sizes)."""
    img = data["clip_img"][rows].clone().requires_grad_()
    txt = data["clip_txt"][rows].clone().requires_grad_()
    extra = data["extra_img"][erows].clone().requires_grad_()
    keys = data["keys"][rows]
    out = DistillationLoss(RelationKDLoss(), contrastive_weight=0.5)(
        img, txt, torch.tensor(10.0), data["teacher"][rows], title_keys=keys,
        extra_image_features=extra, extra_teacher_features=data["extra_teacher"][erows])
    out["total"].backward()
    clip = ClipLoss()(img.detach(), txt.detach(), torch.tensor(10.0), title_keys=keys)["contrastive"]
    return {"losses": {k: v.item() for k, v in out.items()}, "clip": clip.item(),
            "img_grad": img.grad, "txt_grad": txt.grad, "extra_grad": extra.grad}


def test_ddp_loss_and_gradients_match_single_process(tmp_path):
    world_size = 2
    torch.manual_seed(0)
    kinds = sorted(KD_LOSSES)
    splits = [[4, 4], [5, 3]]
    data = {
        "x_img": _randn(_N, _DIN_IMG, seed=30),
        "x_txt": _randn(_N, _DIN_TXT, seed=31),
        "teacher": _randn(_N, _D_T, seed=32),
        "model": _TinyStudent().state_dict(),
        "kd": {name: build_kd_loss(name, _D_S, _D_T).state_dict() for name in kinds},
        "clip_img": _randn(_N, _D_S, seed=33),
        "clip_txt": _randn(_N, _D_S, seed=34),
        "kinds": kinds,
        "splits": splits,
        # Key 0 repeats inside rank 0, key 1 across the ranks (rows 1 and 5).
        "keys": torch.tensor([0, 1, 2, 0, 3, 1, 4, 5]),
        "extra_img": _randn(3, _D_S, seed=35),
        "extra_teacher": _randn(3, _D_T, seed=36),
        "extra_splits": [[2, 1], [1, 2]],  # every rank passes >= 1 (the trainer always does)
    }
    torch.save(data, tmp_path / "data.pt")
    mp.spawn(
        _ddp_worker,
        args=(world_size, str(tmp_path / "init"), str(tmp_path / "data.pt"), str(tmp_path)),
        nprocs=world_size,
        join=True,
    )
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    for name in kinds:
        model = _TinyStudent()
        model.load_state_dict(data["model"])
        kd = build_kd_loss(name, _D_S, _D_T)
        kd.load_state_dict(data["kd"][name])
        ref = _run_case(model, DistillationLoss(kd), data["x_img"], data["x_txt"], data["teacher"])
        assert set(ref["losses"]) == {"contrastive", f"kd_{name}", "total"}
        for split in splits:
            for rank, results in enumerate(per_rank):
                got = results[(tuple(split), name)]
                where = f"{name} split={split} rank={rank}"
                for key, value in ref["losses"].items():
                    assert got["losses"][key] == pytest.approx(value, abs=1e-5), f"{where} {key}"
                start = sum(split[:rank])
                rows = slice(start, start + split[rank])
                for feat in ("img_grad", "txt_grad"):
                    torch.testing.assert_close(
                        got[feat], world_size * ref[feat][rows], atol=1e-5, rtol=1e-4, msg=f"{where} {feat}"
                    )
                for key, grad in ref["param_grads"].items():
                    torch.testing.assert_close(
                        got["param_grads"][key], grad, atol=1e-5, rtol=1e-4, msg=f"{where} param {key}"
                    )
                for key, grad in ref["kd_grads"].items():
                    torch.testing.assert_close(
                        got["kd_grads"][key], grad, atol=1e-5, rtol=1e-4, msg=f"{where} kd {key}"
                    )
        if name == "feature":
            assert set(ref["kd_grads"]) == {"proj.weight"}

    img = data["clip_img"].clone().requires_grad_()
    txt = data["clip_txt"].clone().requires_grad_()
    ref_loss = ClipLoss()(img, txt, torch.tensor(10.0))["contrastive"]
    ref_loss.backward()
    for split in splits:
        for rank, results in enumerate(per_rank):
            got = results[(tuple(split), "clip")]
            assert got["loss"] == pytest.approx(ref_loss.item(), abs=1e-5)
            start = sum(split[:rank])
            rows = slice(start, start + split[rank])
            torch.testing.assert_close(got["img_grad"], world_size * img.grad[rows], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got["txt_grad"], world_size * txt.grad[rows], atol=1e-5, rtol=1e-4)

    ref = _titles_case(data, slice(0, _N), slice(0, 3))
    assert ref["clip"] != pytest.approx(ref_loss.item(), abs=1e-3)  # the repeated keys matter
    for split, extra_split in zip(splits, data["extra_splits"]):
        for rank, results in enumerate(per_rank):
            got, where = results[(tuple(split), "titles")], f"titles split={split} rank={rank}"
            assert got["clip"] == pytest.approx(ref["clip"], abs=1e-5), where
            for key, value in ref["losses"].items():
                assert got["losses"][key] == pytest.approx(value, abs=1e-5), f"{where} {key}"
            start, estart = sum(split[:rank]), sum(extra_split[:rank])
            for feat, rows in (("img_grad", slice(start, start + split[rank])),
                               ("txt_grad", slice(start, start + split[rank])),
                               ("extra_grad", slice(estart, estart + extra_split[rank]))):
                torch.testing.assert_close(got[feat], world_size * ref[feat][rows], atol=1e-5, rtol=1e-4,
                                           msg=f"{where} {feat}")
