"""``graftkd demo``: the whole method on real handwritten digits, with no download and no GPU.

scikit-learn ships 1,797 real 8×8 digits. The demo trains a small CNN teacher on the training split,
draws 1- and 5-shot *unlabeled* sets from it, grafts a half-width student for each, and prints the
students' test accuracy next to the teacher's. Beyond the paper, the demo blends pairs of few-shot
images (label-free mixup, the teacher sees the same blend); every result file records this setting.
"""
from __future__ import annotations

from pathlib import Path

from graftkd.engine.supervised import TeacherRecipe
from graftkd.graft import GraftConfig, ScheduleConfig
from graftkd.refine import DeriveOptions
from graftkd.commands.distill import distill, summary_table
from graftkd.commands.train_teacher import train_teacher

DEMO_SHOTS = (1, 5)
# Digits are never mirrored (a flipped 2 is not a 2): crop with 1-pixel padding only, for teacher and student.
DEMO_TEACHER_RECIPE = TeacherRecipe(
    epochs=15, batch_size=64, lr=0.05, padding=1, flip=False, label_smoothing=0.0, seed=0,
    precision="fp32", channels_last=False,  # same numbers on every CPU, with or without native bf16
)


def run_demo(out: str | Path = "runs/demo", device: str = "cpu", seed: int = 0, progress: bool = True) -> list[dict]:
    from graftkd.data import load_dataset
    from graftkd.data.fewshot import make_manifest
    from graftkd.loaded import load_model_file

    out = Path(out)
    print("graftkd demo: 8x8 handwritten digits (scikit-learn), teacher digits_cnn -> student digits_cnn_half")
    teacher_result = train_teacher("digits_cnn", "digits", out / "teacher", DEMO_TEACHER_RECIPE, device, progress)
    print(f"teacher trained: {teacher_result['test_acc']:.2f}% test accuracy "
          f"({teacher_result['wall_seconds']:.1f} s)")
    teacher = load_model_file("digits_cnn", out / "teacher" / "model.pt", num_classes=10)
    test = load_dataset("digits", "test")
    results = []
    for shots in DEMO_SHOTS:
        manifest = make_manifest("digits", "train", shots, seed)
        manifest.save(out / f"{shots}shot" / "manifest.json")
        config = GraftConfig(
            shots=shots, schedule=ScheduleConfig(preset="digits"), padding=1, flip=False, mixup=True, seed=seed
        )
        print(f"\n{shots}-shot grafting: {shots * 10} unlabeled images")
        payload = distill(
            teacher=teacher, student_arch="digits_cnn_half", fewshot=manifest.materialize(), test=test,
            config=config, device=device, out=out / f"{shots}shot", progress=progress,
            manifest=manifest.to_dict(), label=f"demo {shots}-shot",
            derive=DeriveOptions(init="fresh"),  # the demo shows the paper's grafting from fresh blocks
        )
        print(summary_table(payload))
        results.append(payload)
    print("\nsummary (student = last epoch, test set used only for this report):")
    print(f"  teacher          {results[0]['teacher']['test_acc']:.2f}%")
    for shots, payload in zip(DEMO_SHOTS, results):
        gap = payload["student"]["test_acc"] - payload["teacher"]["test_acc"]
        print(f"  {shots}-shot student  {payload['student']['test_acc']:.2f}% ({gap:+.2f} points)")
    print(f"results: {out}/<k>shot/result.json")
    return results
