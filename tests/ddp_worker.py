"""Worker for tests/test_fulldata.py: the same tiny KD run under ``torchrun`` with 1 or 2 processes.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_FILE
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from graftkd.data.normalize import Normalizer  # noqa: E402
from graftkd.distill.fulldata import KDRecipe, init_distributed, train_kd  # noqa: E402


def tiny_net(width: int, seed: int) -> nn.Module:
    """No BatchNorm: per-process batch statistics would make 2 processes differ from 1 by design."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * width, 4))


def sakd_main(out: Path) -> None:
    """Spot-adaptive KD under DDP: every process must end with the same student and the same agent."""
    import graftkd.distill.sakd as sakd

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_sakd import TinyStaged

    agents = []
    original = sakd.SpotAdaptive.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        agents.append(self)

    sakd.SpotAdaptive.__init__ = remember
    world, device = init_distributed("cpu")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (64,), generator=generator)
    torch.manual_seed(0)
    student, teacher = TinyStaged((4, 6, 8)), TinyStaged((6, 8, 12)).eval()
    recipe = KDRecipe(epochs=2, batch_size=16, lr=0.05, milestones=[1], precision="fp32", eval_every=0, padding=1,
                      distiller="at", adaptive="sakd", homo=False)
    result = train_kd(student, teacher, (images, labels), normalize=Normalizer((0.5,) * 3, (0.25,) * 3),
                      recipe=recipe, device=torch.device(device), world=world, progress=False,
                      student_arch="tiny", teacher_arch="tiny")
    torch.save({"student": dict(student.named_parameters()), "agent": dict(agents[0].named_parameters()),
                "policy": [h["policy_fraction"] for h in result["history"]]}, out.with_suffix(f".rank{world.rank}.pt"))


def loop_main(out: Path) -> None:
    """The shared few-shot loop (patient KD on mixed views) under DDP: same weights as one process."""
    from graftkd.distill.base import FewShotTask, build_method
    from graftkd.engine.recipe import Recipe

    world, device = init_distributed("cpu")
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    recipe = Recipe(samples=16 * 12, batch_size=16, steps_per_chunk=4, recalibrate_bn=False, lr=0.05)
    student, teacher = tiny_net(6, 1), tiny_net(8, 2).eval()
    task = FewShotTask(teacher=teacher, student=student, images=images, normalize=Normalizer((0.5,) * 3, (0.25,) * 3),
                       device=torch.device(device), generator=torch.Generator().manual_seed(3), batch_size=16,
                       epochs=recipe.chunks, lr=recipe.lr, shots=5, num_classes=4, recipe=recipe, precision="fp32",
                       progress=False, log_every=1, world=world, inherit="none")
    outcome = build_method("kd").run(task)
    if world.main:
        torch.save({"state_dict": outcome.student.state_dict(), "world_size": world.size,
                    "images": outcome.stages[0]["images"],
                    "process_images": outcome.stages[0].get("process_images")}, out)


def main() -> None:
    out = Path(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "sakd":
        return sakd_main(out)
    if len(sys.argv) > 2 and sys.argv[2] == "loop":
        return loop_main(out)
    world, device = init_distributed("cpu")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (128, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (128,), generator=generator)
    recipe = KDRecipe(epochs=3, batch_size=16, lr=0.05, milestones=[2], precision="fp32", eval_every=0, padding=1)
    student, teacher = tiny_net(6, 1), tiny_net(8, 2)
    result = train_kd(student, teacher, (images, labels), normalize=Normalizer((0.5,) * 3, (0.25,) * 3),
                      recipe=recipe, device=torch.device(device), world=world, progress=False)
    if world.main:
        torch.save({"state_dict": student.state_dict(), "world_size": result["world_size"],
                    "loss": [h["loss"] for h in result["history"]]}, out)


if __name__ == "__main__":
    main()
