"""The feature-distiller zoo: golden values against independent float64 references, the contract
(gradients, batch of 1, inputs left alone, autocast, modules and init stages), CRD's queue, the
registry, and one SGD step per distiller on two tiny conv nets."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graftkd.distill.zoo as zoo_package
from graftkd.distill.zoo import DISTILLERS, InitStage, build_distiller, list_distillers, resolve_spots
from graftkd.errors import GraftkdError

list_distillers()  # discovery: importing the zoo package alone registers nothing

NAMES = ["ab", "at", "cc", "crd", "fitnet", "fsp", "ft", "nst", "pkt", "rkd", "sp", "vid"]

# (spot_kind, weight) of the benchmark's spec
SPEC = {"fitnet": ("hint", 1.0), "at": ("stages", 1000.0), "sp": ("last_conv", 3000.0), "cc": ("embedding", 0.02),
        "vid": ("stages", 1.0), "rkd": ("embedding", 1.0), "pkt": ("embedding", 30000.0), "ft": ("last_conv", 200.0),
        "ab": ("stages", 1.0), "fsp": ("all", 1.0), "nst": ("stages", 50.0), "crd": ("embedding", 0.8)}

# student spot shapes, teacher spot shapes, options: small, with pooling and channel changes on purpose
CASES = {
    "fitnet": ([(3, 8, 8)], [(5, 4, 4)], {}),
    "at": ([(3, 4, 4), (3, 4, 4), (4, 2, 2)], [(5, 4, 4), (5, 2, 2), (6, 4, 4)], {}),
    "sp": ([(3, 4, 4)], [(5, 2, 2)], {}),
    "cc": ([(6,)], [(10,)], {}),
    "vid": ([(3, 4, 4), (3, 4, 4)], [(5, 4, 4), (5, 2, 2)], {}),
    "rkd": ([(6,)], [(10,)], {}),
    "pkt": ([(6,)], [(10,)], {}),
    "ft": ([(3, 4, 4)], [(6, 2, 2)], {}),
    "ab": ([(3, 4, 4), (3, 4, 4)], [(5, 4, 4), (5, 2, 2)], {}),
    "fsp": ([(3, 4, 4), (4, 4, 4), (5, 2, 2)], [(3, 4, 4), (6, 4, 4), (5, 2, 2)], {}),
    "nst": ([(3, 4, 4), (4, 2, 2)], [(5, 4, 4), (6, 4, 4)], {}),
    "crd": ([(6,)], [(10,)], {"feat_dim": 16, "queue_size": 6}),
}

# Golden scalars: the sum over spots of spot_losses on make_case(name) (batch 4). Each was produced once
# by this file's float64 reference function for that distiller (REFERENCES[name]), printed and pasted.
GOLDEN = {"ab": 3.7933808093, "at": 0.30415719764, "cc": 1.3305606715, "crd": 3.0835891757, "fitnet": 1.6427852237,
          "fsp": 0.15809910992, "ft": 0.26844404716, "nst": 0.79580625203, "pkt": 0.028618456859, "rkd": 2.7736103364,
          "sp": 0.019431793845, "vid": 1.8249805821}

NON_NEGATIVE = set(NAMES) - {"vid", "pkt"}  # VID is a Gaussian NLL without its constant; PKT see below
PARAMETER_FREE = ["at", "sp", "nst", "pkt", "rkd"]


def make_case(name: str, batch: int = 4, grad: bool = False):
    s_shapes, t_shapes, options = CASES[name]
    torch.manual_seed(1)
    distiller = build_distiller(name, s_shapes, t_shapes, **options)
    torch.manual_seed(0)
    student = [torch.randn(batch, *shape) for shape in s_shapes]
    teacher = [torch.randn(batch, *shape) for shape in t_shapes]
    if grad:
        student = [x.requires_grad_() for x in student]
    return distiller, student, teacher


# ----------------------------------------------------------------------------------------------------
# float64 references: loops over samples, pairs, triplets and positions; no torch ops on the data
# ----------------------------------------------------------------------------------------------------

def val(x: torch.Tensor) -> float:
    return float(x.detach())


def npy(x) -> np.ndarray:
    return x.detach().double().numpy()


def unit(v: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return v / max(math.sqrt(float(np.dot(v, v))), eps)


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def leaky(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, 0.1 * x)


def ref_conv2d(x, weight, bias, stride: int, pad: int) -> np.ndarray:
    n, _, h, w = x.shape
    out_c, _, kh, kw = weight.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    out = np.zeros((n, out_c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, :, i, j] = np.tensordot(patch, weight, axes=([1, 2, 3], [1, 2, 3]))
    return out if bias is None else out + bias[None, :, None, None]


def ref_conv_transpose2d(x, weight, bias, stride: int, pad: int) -> np.ndarray:
    """Scatter form: every input pixel adds weight * value to a kh x kw window of the output."""
    n, _, h, w = x.shape
    _, out_c, kh, kw = weight.shape
    full = np.zeros((n, out_c, (h - 1) * stride + kh, (w - 1) * stride + kw))
    for i in range(h):
        for j in range(w):
            full[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw] += np.tensordot(x[:, :, i, j], weight,
                                                                                           axes=([1], [0]))
    out = full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad]
    return out if bias is None else out + bias[None, :, None, None]


def ref_conv_module(x, conv: nn.Module) -> np.ndarray:
    bias = None if conv.bias is None else npy(conv.bias)
    fn = ref_conv_transpose2d if isinstance(conv, nn.ConvTranspose2d) else ref_conv2d
    return fn(x, npy(conv.weight), bias, conv.stride[0], conv.padding[0])


def ref_batchnorm_train(x, bn: nn.BatchNorm2d) -> np.ndarray:
    out = np.empty_like(x)
    gamma, beta = npy(bn.weight), npy(bn.bias)
    for c in range(x.shape[1]):
        v = x[:, c]
        mu = v.mean()
        var = ((v - mu) ** 2).mean()
        out[:, c] = (v - mu) / math.sqrt(var + bn.eps) * gamma[c] + beta[c]
    return out


def ref_adaptive_pool(x, oh: int, ow: int) -> np.ndarray:
    n, c, h, w = x.shape
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def ref_pool_pair(a, b):
    oh, ow = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
    return ref_adaptive_pool(a, oh, ow), ref_adaptive_pool(b, oh, ow)


def ref_linear(x, layer: nn.Linear) -> np.ndarray:
    w, b = npy(layer.weight), npy(layer.bias)
    return np.array([w @ row + b for row in x.reshape(x.shape[0], -1)])


def ref_fitnet(d, student, teacher) -> list[float]:
    out = []
    for reg, s, t in zip(d.regressors, student, teacher):
        s, t = npy(s), npy(t)
        if isinstance(reg, nn.Linear):
            y = ref_linear(s, reg)
        else:
            y = np.maximum(ref_batchnorm_train(ref_conv_module(s, reg.conv), reg.bn), 0.0)
        out.append(float(((y - t) ** 2).mean()))
    return out


def ref_at(d, student, teacher) -> list[float]:
    out = []
    for s, t in zip(student, teacher):
        s, t = ref_pool_pair(npy(s), npy(t))
        total, count = 0.0, 0
        for i in range(s.shape[0]):
            a_s = unit((s[i] ** 2).mean(axis=0).ravel())
            a_t = unit((t[i] ** 2).mean(axis=0).ravel())
            for p in range(a_s.size):
                total += (a_s[p] - a_t[p]) ** 2
                count += 1
        out.append(total / count)
    return out


def ref_sp(d, student, teacher) -> list[float]:
    out = []
    for s, t in zip(student, teacher):
        b = s.shape[0]
        zs, zt = npy(s).reshape(b, -1), npy(t).reshape(b, -1)
        gs = np.array([unit(np.array([zs[i] @ zs[j] for j in range(b)])) for i in range(b)])
        gt = np.array([unit(np.array([zt[i] @ zt[j] for j in range(b)])) for i in range(b)])
        out.append(sum((gt[i, j] - gs[i, j]) ** 2 for i in range(b) for j in range(b)) / b ** 2)
    return out


def ref_cc(d, student, teacher) -> list[float]:
    out = []
    for es_layer, et_layer, s, t in zip(d.embed_s, d.embed_t, student, teacher):
        es = [unit(v) for v in ref_linear(npy(s), es_layer)]
        et = [unit(v) for v in ref_linear(npy(t), et_layer)]
        delta = [np.abs(a - b) for a, b in zip(es, et)]
        b = len(delta)
        out.append(sum(float(delta[i] @ delta[i + 1]) for i in range(b - 1)) / (b - 1) if b > 1 else 0.0)
    return out


def ref_vid(d, student, teacher) -> list[float]:
    out = []
    for reg, theta, s, t in zip(d.regressors, d.log_scales, student, teacher):
        s, t = ref_pool_pair(npy(s), npy(t))
        w1, w2, w3 = (npy(reg[k].weight)[:, :, 0, 0] for k in (0, 2, 4))
        var = np.log1p(np.exp(npy(theta))) + d.eps
        total = 0.0
        for n in range(s.shape[0]):
            for y in range(s.shape[2]):
                for x in range(s.shape[3]):
                    mu = w3 @ np.maximum(w2 @ np.maximum(w1 @ s[n, :, y, x], 0), 0)
                    total += float((0.5 * ((mu - t[n, :, y, x]) ** 2 / var + np.log(var))).sum())
        out.append(total / t.size)
    return out


def ref_rkd(d, student, teacher) -> list[float]:
    out = []
    for s, t in zip(student, teacher):
        es, et = npy(s).reshape(s.shape[0], -1), npy(t).reshape(t.shape[0], -1)
        b = es.shape[0]
        if b < 2:
            out.append(0.0)
            continue
        pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
        ds = {p: np.linalg.norm(es[p[0]] - es[p[1]]) for p in pairs}
        dt = {p: np.linalg.norm(et[p[0]] - et[p[1]]) for p in pairs}
        mean_s, mean_t = sum(ds.values()) / len(pairs), sum(dt.values()) / len(pairs)
        dist = sum(huber(ds[p] / mean_s - dt[p] / mean_t) for p in pairs) / len(pairs)
        angle, count = 0.0, 0
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    if j == i or k == i:
                        continue
                    cos_s = unit(es[j] - es[i]) @ unit(es[k] - es[i])
                    cos_t = unit(et[j] - et[i]) @ unit(et[k] - et[i])
                    angle += huber(cos_s - cos_t)
                    count += 1
        out.append(d.w_d * dist + d.w_a * angle / count)
    return out


def ref_pkt(d, student, teacher) -> list[float]:
    eps = d.eps

    def conditional(z):
        b = z.shape[0]
        z = [row / (math.sqrt(float(row @ row)) + eps) for row in z.reshape(b, -1)]
        sim = [[(float(z[i] @ z[j]) + 1.0) / 2.0 for j in range(b)] for i in range(b)]
        return [[sim[i][j] / sum(sim[i]) for j in range(b)] for i in range(b)]

    out = []
    for s, t in zip(student, teacher):
        ps, pt = conditional(npy(s)), conditional(npy(t))
        b = len(ps)
        out.append(sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
                       for i in range(b) for j in range(b)) / b ** 2)
    return out


def ref_ft_codes(d, student, teacher):
    codes = []
    for trans, para, s, t in zip(d.translators, d.paraphrasers, student, teacher):
        h = npy(s)
        for k in range(3):
            h = leaky(ref_batchnorm_train(ref_conv_module(h, trans[3 * k]), trans[3 * k + 1]))
        g = npy(t)
        for k in (0, 2, 4):
            g = leaky(ref_conv_module(g, para.encoder[k]))
        codes.append((h, g))
    return codes


def ref_ft(d, student, teacher) -> list[float]:
    out = []
    for h, g in ref_ft_codes(d, student, teacher):
        h, g = ref_pool_pair(h, g)
        b = h.shape[0]
        total = sum(float(np.abs(unit(h[i].ravel()) - unit(g[i].ravel())).sum()) for i in range(b))
        out.append(total / h.size)
    return out


def ref_ft_paraphraser(d, teacher) -> float:
    total = 0.0
    for para, t in zip(d.paraphrasers, teacher):
        g = npy(t)
        for k in (0, 2, 4):
            g = leaky(ref_conv_module(g, para.encoder[k]))
        for k in (0, 2, 4):
            g = leaky(ref_conv_module(g, para.decoder[k]))
        total += float(((g - npy(t)) ** 2).mean())
    return total


def ref_ab(d, student, teacher) -> list[float]:
    out, m = [], d.margin
    for conn, s, t in zip(d.connectors, student, teacher):
        s, t = ref_pool_pair(npy(s), npy(t))
        c = ref_batchnorm_train(ref_conv_module(s, conn[0]), conn[1])
        total = 0.0
        for cv, tv in zip(c.ravel(), t.ravel()):
            if cv > -m and tv <= 0:
                total += (cv + m) ** 2
            if cv <= m and tv > 0:
                total += (cv - m) ** 2
        out.append(total / c.size)
    return out


def ref_fsp(d, student, teacher) -> list[float]:
    def gram(a, b):
        a, b = ref_pool_pair(a, b)
        n, c1, c2 = a.shape[0], a.shape[1], b.shape[1]
        hw = a.shape[2] * a.shape[3]
        g = np.zeros((n, c1, c2))
        for i in range(n):
            for p in range(c1):
                for q in range(c2):
                    g[i, p, q] = float(a[i, p].ravel() @ b[i, q].ravel()) / hw
        return g

    s = [npy(x) if isinstance(ad, nn.Identity) else ref_conv_module(npy(x), ad) for ad, x in zip(d.adapters, student)]
    t = [npy(x) for x in teacher]
    return [float(((gram(s[k], s[k + 1]) - gram(t[k], t[k + 1])) ** 2).mean()) for k in range(len(s) - 1)]


def ref_nst(d, student, teacher) -> list[float]:
    out = []
    for s, t in zip(student, teacher):
        s, t = ref_pool_pair(npy(s), npy(t))

        def k_mean(xs, ys):
            return sum(float(x @ y) ** 2 for x in xs for y in ys) / (len(xs) * len(ys))

        total = 0.0
        for n in range(s.shape[0]):
            vs = [unit(s[n, c].ravel()) for c in range(s.shape[1])]
            vt = [unit(t[n, c].ravel()) for c in range(t.shape[1])]
            total += k_mean(vt, vt) + k_mean(vs, vs) - 2 * k_mean(vs, vt)
        out.append(total / s.shape[0])
    return out


def ref_crd_embeddings(d, student, teacher):
    return ([np.array([unit(v) for v in ref_linear(npy(s), layer)]) for layer, s in zip(d.embed_s, student)],
            [np.array([unit(v) for v in ref_linear(npy(t), layer)]) for layer, t in zip(d.embed_t, teacher)])


def ref_info_nce(anchor, positive, queue, filled: int, tau: float) -> float:
    b, total = anchor.shape[0], 0.0
    for i in range(b):
        logits = [float(anchor[i] @ positive[i]) / tau]
        if filled == 0:
            logits += [float(anchor[i] @ positive[j]) / tau for j in range(b) if j != i]
        logits += [float(anchor[i] @ queue[k]) / tau for k in range(filled)]
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[0]
    return total / b


def ref_crd(d, student, teacher) -> list[float]:
    es, et = ref_crd_embeddings(d, student, teacher)
    out = []
    for q, s, t in zip(d.queues, es, et):
        filled = int(q.filled)
        out.append(0.5 * (ref_info_nce(s, t, npy(q.teacher), filled, d.nce_t)
                          + ref_info_nce(t, s, npy(q.student), filled, d.nce_t)))
    return out


REFERENCES = {"fitnet": ref_fitnet, "at": ref_at, "sp": ref_sp, "cc": ref_cc, "vid": ref_vid, "rkd": ref_rkd,
              "pkt": ref_pkt, "ft": ref_ft, "ab": ref_ab, "fsp": ref_fsp, "nst": ref_nst, "crd": ref_crd}


# ----------------------------------------------------------------------------------------------------
# golden values
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_spot_losses_match_the_reference_and_the_golden_value(name: str) -> None:
    d, s, t = make_case(name)
    expected = REFERENCES[name](d, s, t)  # before the call: CRD's queue changes after it
    got = d.spot_losses(s, t)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dim() == 0 and g.dtype == torch.float32
        assert val(g) == pytest.approx(e, rel=1e-5, abs=1e-10)
    assert val(sum(got)) == pytest.approx(GOLDEN[name], rel=1e-4)


@pytest.mark.parametrize("s_shape, t_shape, transposed, kernel, stride", [
    ((3, 4, 4), (5, 4, 4), False, (3, 3), 1),  # equal sizes
    ((3, 8, 8), (5, 4, 4), False, (3, 3), 2),  # student twice the teacher
    ((3, 4, 4), (5, 8, 8), True, (4, 4), 2),   # student half the teacher
    ((3, 6, 5), (5, 4, 4), False, (3, 2), 1),  # student larger
    ((3, 3, 3), (5, 4, 5), True, (2, 3), 1),   # student smaller, not half
])
def test_fitnet_regressor_shapes_and_values(s_shape, t_shape, transposed, kernel, stride) -> None:
    torch.manual_seed(3)
    d = build_distiller("fitnet", [s_shape], [t_shape])
    conv = d.regressors[0].conv
    assert isinstance(conv, nn.ConvTranspose2d) is transposed
    assert tuple(conv.kernel_size) == kernel and conv.stride[0] == stride
    s, t = torch.randn(4, *s_shape), torch.randn(4, *t_shape)
    assert tuple(d.regressors[0](s).shape[1:]) == t_shape
    assert val(d.spot_losses([s], [t])[0]) == pytest.approx(ref_fitnet(d, [s], [t])[0], rel=1e-5)


def test_fitnet_linear_regressor_for_embeddings() -> None:
    torch.manual_seed(3)
    d = build_distiller("fitnet", [(6,)], [(9,)])
    assert isinstance(d.regressors[0], nn.Linear)
    s, t = torch.randn(4, 6), torch.randn(4, 9)
    assert val(d.spot_losses([s], [t])[0]) == pytest.approx(ref_fitnet(d, [s], [t])[0], rel=1e-5)
    with pytest.raises(GraftkdError, match="fitnet"):
        build_distiller("fitnet", [(3, 6, 2)], [(5, 4, 4)])  # taller but narrower: no regressor fits


def test_ft_paraphraser_stage_loss_matches_the_reference() -> None:
    d, s, t = make_case("ft")
    assert val(d.init_stages()[0].loss(s, t)) == pytest.approx(ref_ft_paraphraser(d, t), rel=1e-5)


def test_vid_variance_starts_at_init_var() -> None:
    d, _, _ = make_case("vid")
    for theta in d.log_scales:
        assert torch.allclose(F.softplus(theta) + d.eps, torch.full_like(theta, 5.0))


# ----------------------------------------------------------------------------------------------------
# the contract
# ----------------------------------------------------------------------------------------------------

def test_registry_names_kinds_weights_and_errors() -> None:
    assert list_distillers() == NAMES
    for name, (kind, weight) in SPEC.items():
        cls = DISTILLERS[name]
        assert (cls.name, cls.spot_kind, cls.weight) == (name, kind, weight)
    with pytest.raises(GraftkdError, match="did you mean at"):
        build_distiller("atx", [(3, 4, 4)], [(3, 4, 4)])
    with pytest.raises(GraftkdError, match="distiller 'at'.*unexpected keyword"):
        build_distiller("at", [(3, 4, 4)], [(3, 4, 4)], q=3)
    with pytest.raises(GraftkdError, match="distiller 'crd'.*queue"):
        build_distiller("crd", [(6,)], [(10,)], queue=10)
    with pytest.raises(GraftkdError, match=r"at needs \(C, H, W\)"):
        build_distiller("at", [(6,)], [(6,)])


def test_module_docstrings_cite_the_paper_and_no_host_syncs() -> None:
    folder = Path(zoo_package.__file__).parent
    for name in NAMES:
        text = (folder / f"{name}.py").read_text()
        doc = DISTILLERS[name].__module__
        assert re.search(r"\(.*(19|20)\d\d\)", text.split('"""')[1]), f"{doc}: the docstring cites no paper"
    for path in folder.glob("*.py"):
        text = path.read_text()
        for bad in (".item(", ".cuda(", ".cpu(", ".tolist(", ".numpy(", "nonzero", "print("):
            assert bad not in text, f"{path.name} uses {bad}"


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_student_only_and_inputs_stay_unchanged(name: str) -> None:
    d, s, t = make_case(name, grad=True)
    s_before, t_before = [x.detach().clone() for x in s], [x.clone() for x in t]
    losses = d.spot_losses(s, t)
    for loss in losses:
        assert torch.isfinite(loss)
        if name in NON_NEGATIVE:
            assert val(loss) >= 0.0
        elif name == "pkt":  # a KL divergence up to the eps smoothing
            assert val(loss) >= -1e-6
    torch.stack(losses).sum().backward()
    for x in s:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for x in t:
        assert not x.requires_grad and x.grad is None
    assert all(torch.equal(a, b) for a, b in zip(s, s_before))
    assert all(torch.equal(a, b) for a, b in zip(t, t_before))
    if name == "ft":  # the paraphraser trains only in its own stage
        assert all(p.grad is None for p in d.paraphrasers.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_the_sum_of_the_spot_losses(name: str) -> None:
    d, s, t = make_case(name)
    d.eval()  # CRD: the queue stays as it is between the two calls
    losses = d.spot_losses(s, t)
    expected_count = len(CASES[name][0]) - (1 if name == "fsp" else 0)  # FSP: one loss per consecutive pair
    assert len(losses) == expected_count
    assert val(d(s, t)) == pytest.approx(val(torch.stack(losses).sum()), rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_a_batch_of_one_works(name: str) -> None:
    d, s, t = make_case(name, batch=1, grad=True)
    losses = d.spot_losses(s, t)
    assert all(torch.isfinite(loss) for loss in losses)
    if name in ("cc", "rkd", "crd", "sp", "pkt"):  # no pair to relate (CRD: empty queue, no in-batch negative)
        assert all(val(loss) == 0.0 for loss in losses)
    torch.stack(losses).sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in s)
    expected = REFERENCES[name](*make_case(name, batch=1))
    assert [val(v) for v in losses] == pytest.approx(expected, rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("name", ["at", "sp", "nst", "pkt", "rkd", "fsp"])
def test_zero_loss_when_student_equals_teacher(name: str) -> None:
    shapes = CASES[name][1]  # teacher shapes on both sides (FSP: equal widths, so no adapters)
    d = build_distiller(name, shapes, shapes)
    torch.manual_seed(0)
    feats = [torch.randn(4, *shape) for shape in shapes]
    for loss in d.spot_losses(feats, [f.clone() for f in feats]):
        assert abs(val(loss)) < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_loss_math_is_float32_under_autocast(name: str) -> None:
    d, s, t = make_case(name)
    d.eval()  # BatchNorm on running statistics, CRD's queue left alone: every call sees the same state
    plain = d.spot_losses(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = d.spot_losses(s, t)
        from_bf16 = d.spot_losses([x.bfloat16() for x in s], [x.bfloat16() for x in t])
    for loss in (*cast, *from_bf16):
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    if name in PARAMETER_FREE:  # nothing runs in bfloat16: the values are the float32 ones
        assert [val(v) for v in cast] == pytest.approx([val(v) for v in plain], rel=1e-6)


def _stage_params(stage: InitStage) -> list[torch.Tensor]:
    return [p for m in stage.modules for p in m.parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_student_modules_and_init_stages(name: str) -> None:
    d, s, t = make_case(name)
    stages = d.init_stages()
    if name in ("at", "sp", "nst", "pkt", "rkd"):
        assert d.student_modules() == [] and stages == []
    elif name in ("cc", "vid", "crd", "fitnet"):
        assert d.student_modules() == [d] and stages == []
    elif name == "ft":
        assert d.student_modules() == [d.translators]
        (stage,) = stages
        assert (stage.name, stage.epochs, stage.train_student) == ("ft-paraphraser", 30, False)
        assert (stage.lr, stage.momentum, stage.weight_decay) == (0.01, 0.9, 5e-4)
        assert stage.modules == [d.paraphrasers] and stage.freeze_after == [d.paraphrasers]
        assert build_distiller("ft", *CASES["ft"][:2], paraphraser_epochs=5).init_stages()[0].epochs == 5
    elif name == "ab":
        assert d.student_modules() == [d.connectors]
        (stage,) = stages
        assert (stage.name, stage.epochs, stage.train_student, stage.modules) == ("ab-init", 30, True, [d.connectors])
        assert build_distiller("ab", *CASES["ab"][:2], init_epochs=4).init_stages()[0].epochs == 4
    elif name == "fsp":
        assert d.student_modules() == [d]
        assert sum(not isinstance(a, nn.Identity) for a in d.adapters) == 1  # only the 4 -> 6 channel spot
        (stage,) = stages
        assert (stage.name, stage.epochs, stage.train_student, stage.modules) == ("fsp-init", 30, True, [d])
        same = build_distiller("fsp", CASES["fsp"][1], CASES["fsp"][1], init_epochs=2)
        assert same.student_modules() == [] and same.init_stages()[0].epochs == 2
    for stage in stages:
        assert torch.isfinite(stage.loss(s, t))


# ----------------------------------------------------------------------------------------------------
# CRD's queue
# ----------------------------------------------------------------------------------------------------

def test_crd_queue_is_a_bounded_fifo_of_detached_embeddings() -> None:
    d, s1, t1 = make_case("crd", grad=True)  # queue_size 6, feat_dim 16, batch 4
    q = d.queues[0]
    torch.manual_seed(5)
    s2, t2 = [torch.randn(4, 6, requires_grad=True)], [torch.randn(4, 10)]
    es1, et1 = ref_crd_embeddings(d, s1, t1)
    es2, et2 = ref_crd_embeddings(d, s2, t2)

    loss1 = d.spot_losses(s1, t1)[0]
    assert (int(q.ptr), int(q.filled)) == (4, 4)
    assert np.allclose(npy(q.student[:4]), es1[0], atol=1e-6) and np.allclose(npy(q.teacher[:4]), et1[0], atol=1e-6)

    # the second batch's loss sees the first batch as negatives (no in-batch negatives any more)
    expected = 0.5 * (ref_info_nce(es2[0], et2[0], et1[0], 4, d.nce_t)
                      + ref_info_nce(et2[0], es2[0], es1[0], 4, d.nce_t))
    loss2 = d.spot_losses(s2, t2)[0]
    assert val(loss2) == pytest.approx(expected, rel=1e-5)
    # FIFO with wrap-around: slots 4, 5 take samples 0, 1 of batch 2, slots 0, 1 take samples 2, 3
    assert (int(q.ptr), int(q.filled)) == (2, 6)
    assert np.allclose(npy(q.student), np.concatenate([es2[0][2:], es1[0][2:], es2[0][:2]]), atol=1e-6)
    assert np.allclose(npy(q.teacher), np.concatenate([et2[0][2:], et1[0][2:], et2[0][:2]]), atol=1e-6)
    for buf in (q.student, q.teacher):
        assert buf.shape == (6, 16) and not buf.requires_grad and buf.grad_fn is None
    (loss1 + loss2).backward()  # the in-place queue updates did not break either graph
    assert all(x.grad is not None for x in (*s1, *s2))

    d.eval()  # eval mode: the queue does not change
    state = {k: v.clone() for k, v in d.state_dict().items()}
    d.spot_losses(s1, t1)
    assert all(torch.equal(state[k], v) for k, v in d.state_dict().items())

    d.train()  # a batch larger than the queue keeps its last queue_size samples; nothing grows
    big_s, big_t = [torch.randn(9, 6)], [torch.randn(9, 10)]
    es_big, _ = ref_crd_embeddings(d, big_s, big_t)
    d.spot_losses(big_s, big_t)
    assert q.student.shape == (6, 16) and (int(q.ptr), int(q.filled)) == (2, 6)
    assert np.allclose(npy(q.student), np.concatenate([es_big[0][7:], es_big[0][3:7]]), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# one SGD step on tiny conv nets
# ----------------------------------------------------------------------------------------------------

class TinyNet(nn.Module):
    """Stem + three conv stages + pooled embedding; returns ([f_0 .. f_4], logits)."""

    def __init__(self, widths: tuple[int, ...], strides: tuple[int, ...], num_classes: int = 5) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.stem = block(3, widths[0], 1)
        self.stages = nn.ModuleList(block(widths[k], widths[k + 1], strides[k]) for k in range(3))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor):
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        feats.append(F.adaptive_avg_pool2d(feats[-1], 1).flatten(1))
        return feats, self.fc(feats[-1])


def _changed(before: list[torch.Tensor], params: list[torch.Tensor]) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, params))


@pytest.mark.parametrize("student_strides", [(1, 2, 2), (1, 1, 2)], ids=["same-maps", "larger-maps"])
@pytest.mark.parametrize("name", NAMES)
def test_one_sgd_step_on_tiny_nets(name: str, student_strides: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    teacher = TinyNet((4, 4, 8, 16), (1, 2, 2)).eval()
    student = TinyNet((4, 4, 4, 8), student_strides)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    with torch.no_grad():
        t_all, _ = teacher(x)
        s_all, _ = student(x)
    spots = resolve_spots(DISTILLERS[name].spot_kind, len(s_all), len(t_all))
    d = build_distiller(name, [tuple(s_all[i].shape[1:]) for i, _ in spots],
                        [tuple(t_all[j].shape[1:]) for _, j in spots])
    t_feats = [t_all[j] for _, j in spots]
    s_params = list(student.parameters())
    extra = [p for m in d.student_modules() for p in m.parameters()]
    opt = torch.optim.SGD(s_params + extra, lr=0.1)
    before_s, before_extra = [p.detach().clone() for p in s_params], [p.detach().clone() for p in extra]

    s_all, logits = student(x)
    distill = d([s_all[i] for i, _ in spots], t_feats)
    # the distiller alone moves the student
    grads = torch.autograd.grad(distill, s_params, retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    loss = F.cross_entropy(logits, y) + d.weight * distill
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert _changed(before_s, s_params)
    assert not extra or _changed(before_extra, extra)

    stages = d.init_stages()
    for stage in stages:
        params = _stage_params(stage) + (s_params if stage.train_student else [])
        before = [p.detach().clone() for p in _stage_params(stage)]
        opt = torch.optim.SGD(params, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay)
        for p in s_params:
            p.grad = None
        s_all, _ = student(x)
        stage_loss = stage.loss([s_all[i] for i, _ in spots], t_feats)
        assert torch.isfinite(stage_loss)
        opt.zero_grad()
        stage_loss.backward()
        opt.step()
        assert _changed(before, _stage_params(stage))
        if not stage.train_student:  # FT's paraphraser learns from the teacher alone
            assert all(p.grad is None for p in s_params)


def test_fitnet_1x1_regressor_is_a_bias_free_conv_and_refuses_other_sizes() -> None:
    d = build_distiller("fitnet", [(3, 4, 4)], [(5, 4, 4)], regressor="1x1")
    (reg,) = d.regressors
    assert isinstance(reg, nn.Conv2d) and reg.kernel_size == (1, 1) and reg.bias is None
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    assert torch.allclose(d([s], [t]), ((reg(s) - t) ** 2).mean())
    with pytest.raises(GraftkdError, match="maps of one size"):
        build_distiller("fitnet", [(3, 8, 8)], [(5, 4, 4)], regressor="1x1")
    with pytest.raises(GraftkdError, match="unknown regressor 'deep'"):
        build_distiller("fitnet", [(3, 4, 4)], [(5, 4, 4)], regressor="deep")
