"""Hashes of the trained weights and logged losses of every training path, to compare two commits.

Why: a refactor of the training loop must leave every result unchanged; this trains tiny models through each
path (supervised teacher training, full-data distillation with init stages and SAKD, every few-shot method,
the patient recipe with its options) on one thread and prints a hash per path. Run it at two commits and diff:

    git worktree add /tmp/before <commit> && (cd /tmp/before && PYTHONPATH=src python benchmarks/loop_hashes.py) > a.json
    PYTHONPATH=src python benchmarks/loop_hashes.py > b.json && diff a.json b.json

benchmarks/results/loop_hashes-cpu.json holds the output at the commit it names; the refactor into
engine/training.py left all 15 unchanged (same CPU, one thread).
"""
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
import torch  # noqa: E402

torch.set_num_threads(1)
from graftkd.data.normalize import Normalizer  # noqa: E402

REPORT, sys.stdout = sys.stdout, sys.stderr  # the trainers' progress lines go to stderr; stdout gets the JSON only

def h(module_or_sd, extra=None):  # noqa: E302
    sd = module_or_sd.state_dict() if hasattr(module_or_sd, "state_dict") else module_or_sd
    m = hashlib.sha256()
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            m.update(k.encode()); m.update(v.detach().float().contiguous().numpy().tobytes())
    if extra is not None:
        m.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return m.hexdigest()[:16]

out = {}
# --- supervised
from graftkd.engine.supervised import TeacherRecipe, train_supervised
from ddp_worker import tiny_net
from test_sakd import TinyStaged
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8, generator=g)
labels = torch.randint(0, 4, (70,), generator=g)
for sched in ("onecycle", "cosine"):
    torch.manual_seed(0)
    net = TinyStaged((4, 6, 8))
    r = train_supervised(net, images, labels, normalize=Normalizer((0.5,) * 3, (0.25,) * 3),
                         recipe=TeacherRecipe(epochs=3, batch_size=16, schedule=sched, precision="fp32", channels_last=False),
                         device=torch.device("cpu"), progress=False, test=(images, labels))
    out[f"supervised-{sched}"] = h(net, [(e["loss"], e["lr_end"]) for e in r["history"]] + [r["test_acc"]])
# --- full data
from graftkd.distill.fulldata import KDRecipe, train_kd
for name, kw in [("kd", {}), ("fitnet", {"distiller": "fitnet"}), ("ft", {"distiller": "ft"}),
                 ("sakd-at", {"distiller": "at", "adaptive": "sakd", "homo": False}), ("ce", {"kd_weight": 0.0})]:
    torch.manual_seed(0)
    student, teacher = TinyStaged((4, 6, 8)), TinyStaged((6, 8, 12)).eval()
    recipe = KDRecipe(epochs=3, batch_size=16, lr=0.05, milestones=[2], precision="fp32", eval_every=2, padding=1, **kw)
    r = train_kd(student, teacher, (images[:64], labels[:64]), normalize=Normalizer((0.5,) * 3, (0.25,) * 3),
                 recipe=recipe, device=torch.device("cpu"), progress=False, test=(images, labels),
                 student_arch="tiny", teacher_arch="tiny")
    out[f"fulldata-{name}"] = h(student, [{k: v for k, v in e.items() if k != "images_per_second"} for e in r["history"]]
                                + r["init_history"] + [r["last_epoch_test_acc"]])
# --- few-shot
from graftkd.distill.base import FewShotTask, build_method
from graftkd.engine.recipe import Recipe
from graftkd.models import build_model
def task(epochs=6, recipe=None, **kw):
    torch.manual_seed(1)
    teacher = build_model("digits_cnn").eval()
    torch.manual_seed(0)
    student = build_model("digits_cnn_half")
    imgs = torch.randint(0, 256, (20, 1, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    extra = dict(recipe=recipe, precision="fp32") if recipe is not None else {}
    return FewShotTask(teacher=teacher, student=student, images=imgs, normalize=Normalizer((0.0,), (1.0,)),
                       device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                       batch_size=recipe.batch_size if recipe else 8, epochs=recipe.chunks if recipe else epochs,
                       lr=recipe.lr if recipe else 1e-3, shots=2, num_classes=10, log_every=2, progress=False, **extra, **kw)
from graftkd.graft import ScheduleConfig
for name in ("kd", "fitnet", "whole", "cross", "graft"):
    try:
        kw = {"schedule": ScheduleConfig(block_epochs=2, net_epochs=2)} if name == "graft" else {}
        o = build_method(name).run(task(**kw))
        out[f"fewshot-{name}"] = h(o.student, [{k: v for k, v in s.items() if k not in ("seconds", "images_per_second")} for s in o.stages])
    except Exception as e:
        out[f"fewshot-{name}"] = f"error {type(e).__name__}: {e}"[:120]
for name, rk in [("patient", {}), ("patient-ema-anchor", {"ema": 0.9, "anchor": 0.01}), ("patient-adv", {"adversarial": 0.01})]:
    rec = Recipe(samples=8 * 10, batch_size=8, steps_per_chunk=3, mix="mixup+cutmix", **rk)
    o = build_method("kd").run(task(recipe=rec))
    out[f"fewshot-{name}"] = h(o.student, [{k: v for k, v in s.items() if k not in ("seconds", "images_per_second")} for s in o.stages])
from graftkd.engine.runtime import run_facts  # noqa: E402

print(json.dumps({**run_facts(torch.device("cpu"), seed=0), "hashes": out}, indent=1), file=REPORT)
