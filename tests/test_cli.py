"""The command line as a new user meets it: a tiny real run, and one-line errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from graftkd.cli import main
from graftkd.models import build_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    code = main(["train-teacher", "--arch", "digits_cnn", "--data", "digits", "--out", str(out), "--epochs", "3",
                 "--batch-size", "64", "--lr", "0.05", "--padding", "1", "--device", "cpu", "--no-progress"])
    assert code == 0
    return out / "model.pt"


def _distill_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--teacher-arch", "digits_cnn", "--student-arch", "digits_cnn_half",
            "--preset", "digits", "--block-epochs", "2", "--net-epochs", "2", "--init", "fresh", "--device", "cpu",
            "--no-progress", "--out", str(out), *extra]


def test_fewshot_then_distill_writes_a_loadable_student_and_a_traceable_result(tmp_path, digits_teacher, capsys):
    manifest = tmp_path / "m.json"
    assert main(["fewshot", "--data", "digits", "--k", "2", "--seed", "3", "--out", str(manifest)]) == 0
    assert json.loads(manifest.read_text())["k"] == 2
    out = tmp_path / "run"
    assert main(_distill_args(digits_teacher, out, "--fewshot", str(manifest), "--seed", "3")) == 0
    table = capsys.readouterr().out
    assert "test accuracy" in table and "compression" in table
    result = json.loads((out / "result.json").read_text())
    for key in ("command", "commit", "seed", "device", "wall_seconds", "protocol"):
        assert key in result
    from test_records import documented_fields

    from graftkd.records import RESULT_SCHEMA

    assert result["schema_version"] == RESULT_SCHEMA and set(result) <= documented_fields()  # docs/results.md
    assert result["seed"] == 3 and result["fewshot"]["images"] == 20
    assert 0 <= result["student"]["test_acc"] <= 100 and result["teacher"]["test_acc"] > 50
    assert result["graft"]["merge_max_abs_diff"] <= 1e-4
    saved = torch.load(out / "student.pt", weights_only=True)
    fresh = build_model(saved["arch"], num_classes=10)
    fresh.load_state_dict(saved["state_dict"], strict=True)
    assert not (out / "checkpoint.pt").exists()
    assert not list(out.glob(".*.tmp"))


def test_default_distill_derives_the_student_and_records_how(tmp_path, digits_teacher):
    out = tmp_path / "derived"
    assert main(["distill", "--teacher", str(digits_teacher), "--teacher-arch", "digits_cnn", "--student-arch",
                 "digits_cnn_half", "--data", "digits", "--k", "2", "--samples", "640", "--device", "cpu",
                 "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["init"]["used"] == "derived" and result["derive"]["refine"] == "auto"
    assert all(row["status"] == "channels chosen" for row in result["derivation"]["blocks"])
    # channels chosen: the resolver repairs first, then trains only if the repaired student is not close enough
    resolved = result["resolved"]
    assert resolved["repair"] and result["repair"]["applied"] and result["bn_start"]["used"] == "teacher"
    assert resolved["why"].startswith("channels chosen") and 0 <= resolved["agreement_after_repair"] <= 100
    trained = resolved["agreement_after_repair"] < resolved["stop_at"]
    assert result["method"] == ("derived+kd" if trained else "derived+none") and resolved["refine"] == (
        "kd" if trained else "none")
    assert 0 <= result["label_free"]["agreement"] <= 100 and result["label_free"]["views"] == 2 * 8 * 20
    from test_records import documented_fields

    assert set(result) <= documented_fields(), set(result) - documented_fields()
    saved = torch.load(out / "student.pt", weights_only=True)
    build_model(saved["arch"], num_classes=10).load_state_dict(saved["state_dict"], strict=True)
    again = tmp_path / "again"
    assert main(["distill", "--teacher", str(digits_teacher), "--teacher-arch", "digits_cnn", "--student-arch",
                 "digits_cnn_half", "--data", "digits", "--k", "2", "--samples", "640", "--device", "cpu",
                 "--no-progress", "--out", str(again)]) == 0
    assert json.loads((again / "result.json").read_text())["student"]["test_acc"] == result["student"]["test_acc"]


@pytest.mark.parametrize("threshold, method", [(0.0, "derived+none"), (101.0, "derived+kd")])
def test_the_resolver_stops_after_the_repair_only_when_the_student_is_close_enough(
        tmp_path, digits_teacher, monkeypatch, threshold, method):
    import graftkd.refine as refine

    monkeypatch.setattr(refine, "REPAIRED_ENOUGH", threshold)
    # the path's own budget and count of synthetic images, scaled down (6 images: more than the cap of one per
    # SYNTH_SAMPLES_PER_IMAGE samples that a budget given with --samples would set)
    monkeypatch.setattr(refine, "WIDTH_SYNTH_BUDGET", 640)
    monkeypatch.setattr(refine, "SYNTH", 6)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(digits_teacher), "--teacher-arch", "digits_cnn", "--student-arch",
                 "digits_cnn_half", "--data", "digits", "--k", "1", "--device", "cpu",
                 "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == method and result["resolved"]["stop_at"] == threshold
    if method == "derived+kd":  # trained: KD plus the teacher's feature maps, the whole budget
        assert result["resolved"]["loss"] == "feature_kd" and result["refine"]["stages"][0]["steps"] == 10
        # from the whole teacher, the dropped channels fading out (the repaired weights set aside)
        assert result["derive"]["fade"] == refine.FADE and result["fade"]["steps"] == round(refine.FADE * 10)
        assert result["fade"]["faded_readers"] and result["bn_start"]["used"] == "teacher"
        assert "fading out" in result["resolved"]["why"] and result["repair"]["set_aside"]
        assert "temperature 16" in result["resolved"]["why"] and result["derive"]["loss_options"] == {"temperature": 16.0}
        assert result["refine"]["bn_recalibrated"]["norms"] > 0
        # on the few-shot images plus the path's synthetic ones, at the path's budget
        made = 6
        assert result["synth"]["made"] == made and result["derive"]["recipe"]["synth"] == made
        assert result["derive"]["recipe"]["samples"] == 640
        assert result["resolved"]["synth"] == made and f"{made} images synthesised" in result["resolved"]["why"]
    else:  # not trained: no synthetic images made or recorded
        assert result["refine"] is None and result.get("synth") is None
        assert result["derive"]["recipe"]["synth"] == 0 and result["resolved"]["synth"] == 0
        assert "synthesised" not in result["resolved"]["why"]


def test_explicit_refinement_options_switch_the_resolver_off(tmp_path, digits_teacher):
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(digits_teacher), "--teacher-arch", "digits_cnn", "--student-arch",
                 "digits_cnn_half", "--data", "digits", "--k", "1", "--samples", "640", "--refine-loss", "kd",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert "resolved" not in result and result["method"] == "derived+kd" and not result["derive"]["repair"]


def test_init_derived_on_a_pair_that_does_not_fit_is_one_clear_line(tmp_path, digits_teacher, capsys):
    code = main(["distill", "--teacher", str(digits_teacher), "--teacher-arch", "digits_cnn", "--student-arch",
                 "resnet8", "--data", "digits", "--k", "1", "--init", "derived",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code != 0 and "--init derived" in err and "--init fresh" in err


def test_distill_from_an_unlabeled_folder(tmp_path, digits_teacher):
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        pixels = torch.randint(0, 256, (8, 8), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{i:02d}.png")
    # the teacher expects 1 channel, so the folder is read as grayscale; no test data → no accuracy
    code = main(_distill_args(digits_teacher, tmp_path / "run", "--unlabeled", str(folder), "--num-classes", "10"))
    assert code == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["fewshot"]["images"] == 12 and result["student"]["test_acc"] is None
    assert result["fewshot"]["shots"] is None  # no classes are known for a folder: no "per class" claim
    unlabeled = result["fewshot"]["unlabeled"]
    listing = json.loads((tmp_path / "run" / "unlabeled.json").read_text())
    assert unlabeled["files"] == 12 == len(listing["files"]) and listing["files"][0]["path"] == "00.png"
    import hashlib

    assert listing["files"][3]["sha256"] == hashlib.sha256((folder / "03.png").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda t, d: _distill_args(t, d / "o", "--data", "digits", "--k", "500"), "K=500 needs"),
        (lambda t, d: _distill_args(t, d / "o", "--unlabeled", str(d), "--num-classes", "10"), "no images found"),
        (lambda t, d: ["distill", "--teacher", str(t), "--teacher-arch", "resnet20", "--student-arch", "resnet20",
                       "--data", "digits", "--k", "1", "--out", str(d / "o")], "another architecture"),
        (lambda t, d: _distill_args(t, d / "o", "--data", "digits", "--k", "1", "--device", "cuda:7"), "cuda"),
        (lambda t, d: ["evaluate", "--arch", "digits_cnn", "--weights", str(d / "missing.pt"), "--data", "digits"],
         "not found"),
    ],
    ids=["k-too-large", "empty-folder", "wrong-architecture", "missing-device", "missing-file"],
)
def test_bad_input_ends_in_one_line_and_writes_nothing(tmp_path, digits_teacher, make_args, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "graftkd.cli", *make_args(digits_teacher, empty)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("graftkd: error:"), proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (empty / "o").exists() or not any((empty / "o").iterdir())


def test_malicious_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    proc = subprocess.run(
        [sys.executable, "-m", "graftkd.cli", "evaluate", "--arch", "digits_cnn", "--weights", str(path),
         "--data", "digits"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "refused to load" in proc.stderr and "code ran" not in proc.stdout


@pytest.mark.shared
@pytest.mark.slow
def test_resnet56_teacher_loads_and_grafts_resnet20_on_cifar10_shapes(tmp_path):
    """The paper pair on the real teacher: a short schedule on 10-shot CIFAR-10, exact merge."""
    from graftkd.data import make_manifest
    from graftkd.graft import GraftConfig, ScheduleConfig, graft
    from graftkd.loaded import load_model_file, normalizer

    teacher = load_model_file("resnet56", SHARED / "teachers" / "resnet56-4bfd9763.th", num_classes=10)
    manifest = make_manifest(str(SHARED / "data" / "cifar10.tar.gz"), "train", 1, seed=0)
    fewshot = manifest.materialize()
    student = build_model("resnet20")
    config = GraftConfig(shots=1, schedule=ScheduleConfig("cifar10", block_epochs=1, net_epochs=1))
    result = graft(teacher.model, student, fewshot.images, normalize=normalizer(teacher.mean, teacher.std),
                   config=config, device="cpu", progress=False)
    assert result.merge_max_abs_diff <= 1e-4 and len(result.stages) == 5


def test_models_lists_params_and_flops(capsys):
    assert main(["models"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "5.41M" in lines["vgg16_graft"] and "14.98M" in lines["vgg16"] and "0.27M" in lines["resnet20"]


def test_distill_without_a_source_says_where_images_come_from(tmp_path, digits_teacher, capsys):
    code = main(["distill", "--teacher", str(digits_teacher), "--teacher-arch", "digits_cnn", "--student-arch",
                 "digits_cnn_half", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--data SOURCE --k K" in err and "--unlabeled" in err


@pytest.mark.parametrize("method", ["kd", "fskd"])
def test_distill_runs_any_registered_method_and_export_ships_it(tmp_path, digits_teacher, method):
    """`distill --method NAME` writes student.pt and result.json for a registered method (FSKD builds its own
    student from the teacher); `export` ships the student; a misspelt name names the close ones."""
    out = tmp_path / method
    args = [a for a in _distill_args(digits_teacher, out, "--data", "digits", "--k", "1", "--method", method)
            if a not in ("--init", "fresh")]
    assert main(args) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == method and result["init"]["why"].startswith(f"--method {method}")
    assert result["budget"]["epochs"] > 0 and result["student"]["test_acc"] is not None
    assert main(["export", "--weights", str(out / "student.pt"), "--out", str(tmp_path / "export"),
                 "--formats", "state_dict"]) == 0
    assert any((tmp_path / "export").iterdir())


def test_distill_method_errors_before_any_work(tmp_path, digits_teacher, capsys):
    args = [a for a in _distill_args(digits_teacher, tmp_path / "x", "--data", "digits", "--k", "1") if a != "fresh"]
    assert main([*[a for a in args if a != "--init"], "--method", "kdd"]) == 2
    assert "kdd" in capsys.readouterr().err
    assert main([*[a for a in args if a != "--init"], "--method", "kd", "--init", "derived"]) == 2
    assert "--refine-loss" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_students_lists_what_fits_and_auto_picks_a_derivable_one(tmp_path, digits_teacher, capsys):
    assert main(["students", "--teacher", str(digits_teacher), "--teacher-arch", "digits_cnn"]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith("digits_cnn_half"))
    assert row.rstrip().endswith("whole"), listing
    out = tmp_path / "auto"
    args = [a if a != "digits_cnn_half" else "auto:2x"
            for a in _distill_args(digits_teacher, out, "--data", "digits", "--k", "1")]
    assert main(args) == 0
    student = json.loads((out / "result.json").read_text())["student"]
    assert student["arch"] == "digits_cnn_half" and "auto:2x" in student["chosen_because"]
    assert main([*args, "--out", str(tmp_path / "bad"), "--student-arch", "auto:0.5x"]) == 2
    assert "above 1x" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_student_file_names_its_architecture_and_classes(tmp_path, digits_teacher, capsys):
    out = tmp_path / "run"
    assert main(_distill_args(digits_teacher, out, "--data", "digits", "--k", "1")) == 0
    saved = torch.load(out / "student.pt", weights_only=True)
    assert saved["classes"] and len(saved["classes"]) == 10
    capsys.readouterr()
    assert main(["evaluate", "--weights", str(out / "student.pt"), "--data", "digits", "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out
    plain = tmp_path / "plain.pt"
    torch.save(saved["state_dict"], plain)
    assert main(["evaluate", "--weights", str(plain), "--data", "digits"]) == 2
    assert "--arch" in capsys.readouterr().err


def test_report_on_a_folder_of_distill_runs_writes_a_table_and_a_png(tmp_path, digits_teacher, capsys):
    for name, extra in (("a", ()), ("b", ("--seed", "1"))):
        assert main(_distill_args(digits_teacher, tmp_path / "runs" / name, "--data", "digits", "--k", "1", *extra)) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "runs")]) == 0
    table = (tmp_path / "runs" / "runs.md").read_text()
    assert "| a |" in table and "| b |" in table and "digits_cnn_half" in table
    png = tmp_path / "runs" / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_a_method_can_train_with_the_patient_recipe(tmp_path, digits_teacher, capsys):
    out = tmp_path / "kd"
    args = [a for a in _distill_args(digits_teacher, out, "--data", "digits", "--k", "1", "--method", "kd",
                                     "--recipe", "patient", "--samples", "640") if a not in ("--init", "fresh")]
    args = [a for i, a in enumerate(args) if a not in ("--block-epochs", "--net-epochs") and
            args[i - 1] not in ("--block-epochs", "--net-epochs")]
    assert main(args) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["recipe"]["name"] == "patient" and result["recipe"]["samples"] == 640
    assert result["refine"]["stages"][0]["images"] == 640
    assert main([*args, "--method", "fskd"]) == 2
    assert "--recipe paper" in capsys.readouterr().err


def test_any_zoo_distiller_runs_as_a_few_shot_method(tmp_path, digits_teacher):
    out = tmp_path / "pkt"
    assert main(["distill", "--teacher", str(digits_teacher), "--teacher-arch", "digits_cnn", "--student-arch",
                 "digits_cnn_half", "--data", "digits", "--k", "2", "--method", "zoo", "--method-option",
                 "distiller=pkt", "--method-option", "beta=2.5", "--preset", "digits", "--block-epochs", "2",
                 "--net-epochs", "1", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "zoo" and result["method_options"]["distiller"] == "pkt"
    stage = result["refine"]["stages"][0]  # KD plus the distiller's term, both recorded
    assert set(stage["loss_terms"]) == {"kd", "pkt"} and stage["steps"] > 0
    saved = torch.load(out / "student.pt", weights_only=True)
    build_model(saved["arch"], num_classes=10).load_state_dict(saved["state_dict"], strict=True)


def test_method_options_are_checked_before_any_work(tmp_path, digits_teacher, capsys):
    for extra, says in ((["--method", "zoo", "--method-option", "distiller=nope"], "unknown distiller 'nope'"),
                        (["--method", "zoo", "--method-option", "colour=red"], "has no option colour"),
                        (["--method-option", "x=1"], "goes with --method NAME"),
                        (["--method", "zoo", "--method-option", "distiller=ab"], "pre-training stages")):
        code = main(["distill", "--teacher", str(digits_teacher), "--teacher-arch", "digits_cnn", "--student-arch",
                     "digits_cnn_half", "--data", "digits", "--k", "1", "--device", "cpu", "--no-progress",
                     "--out", str(tmp_path / "x"), *extra])
        assert code == 2 and says in capsys.readouterr().err, extra


def test_config_file_and_set_reach_the_run_and_the_command_line_wins(tmp_path, digits_teacher):
    """`--config FILE` takes a grid row's tokens or a mapping of options; `--set PATH=VALUE` overrides any field
    of the nested settings; options on the command line win over the file's."""
    config = tmp_path / "run.yaml"
    config.write_text("teacher-arch: digits_cnn\nstudent_arch: digits_cnn_half\ndata: digits\nk: 2\nsamples: 1280\n"
                      "init: derived\nrefine-loss: kd\nno-progress: true\nprecision: fp32\n"
                      "set: [derive.recipe.warmup=0.2, graft.log_every=5]\n")
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(digits_teacher), "--config", str(config), "--samples", "640",
                 "--set", "derive.recipe.mix=cutmix", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    recipe = result["derive"]["recipe"]
    assert recipe["samples"] == 640 and recipe["warmup"] == 0.2 and recipe["mix"] == "cutmix"
    assert result["student"]["arch"] == "digits_cnn_half" and result["config"]["log_every"] == 5
    row = tmp_path / "row.yaml"  # the grid row format: a list of tokens
    row.write_text('[--init, derived, --refine, none, --repair]\n')
    again = tmp_path / "row"
    assert main(["distill", "--config", str(row), "--teacher", str(digits_teacher), "--teacher-arch", "digits_cnn",
                 "--student-arch", "digits_cnn_half", "--data", "digits", "--k", "2", "--device", "cpu",
                 "--no-progress", "--out", str(again)]) == 0
    result = json.loads((again / "result.json").read_text())
    assert result["method"] == "derived+none" and result["repair"]["applied"]


@pytest.mark.parametrize("extra, file_text, message", [
    (["--set", "derive.recipe.sampels=10"], None, "unknown key 'derive.recipe.sampels' (did you mean 'samples'?)"),
    (["--set", "derive.recipe.samples=many"], None, "derive.recipe.samples must be an integer or null, got 'many'"),
    (["--set", "derive.loss=l2"], None, "--set derive.loss=l2: unknown loss 'l2'"),
    (["--set", "graf.seed=1"], None, "unknown group 'graf' (did you mean 'graft'?)"),
    (["--set", "derive.recipe"], None, "write PATH=VALUE"),
    ([], "sampels: 10\n", "unknown option 'sampels' (did you mean 'samples'?)"),
    ([], "[--sampels, '10']\n", "unknown option '--sampels'"),
    ([], "samples: [1, 2\n", "not valid YAML"),
    ([], "3\n", "must be a list of option tokens or a mapping"),
])
def test_bad_config_or_set_fails_in_one_line_before_any_work(tmp_path, capsys, extra, file_text, message):
    args = ["distill", "--teacher", "resnet56-cifar10", "--student-arch", "resnet20", "--data", "digits", "--k", "1",
            "--out", str(tmp_path / "o"),
            *extra]
    if file_text is not None:
        (tmp_path / "c.yaml").write_text(file_text)
        args += ["--config", str(tmp_path / "c.yaml")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_a_named_fade_on_the_default_path_starts_from_the_teacher_without_the_repair(tmp_path, digits_teacher,
                                                                                    monkeypatch):
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(digits_teacher), "--teacher-arch", "digits_cnn", "--student-arch",
                 "digits_cnn_half", "--data", "digits", "--k", "1", "--samples", "640", "--fade", "0.5", "--device",
                 "cpu", "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    resolved = result["resolved"]
    assert not resolved["repair"] and resolved["stop_at"] is None and "--fade 0.5 given" in resolved["why"]
    assert "repair" not in result and result["fade"]["steps"] == 5 and result["method"] == "derived+kd"
    # --fade 0 on the default path: the repaired start is trained as before (the check does not bring fading back)
    import graftkd.refine as refine

    monkeypatch.setattr(refine, "REPAIRED_ENOUGH", 101.0)
    cut = tmp_path / "cut"
    assert main(["distill", "--teacher", str(digits_teacher), "--teacher-arch", "digits_cnn", "--student-arch",
                 "digits_cnn_half", "--data", "digits", "--k", "1", "--samples", "640", "--fade", "0", "--device",
                 "cpu", "--no-progress", "--out", str(cut)]) == 0
    result = json.loads((cut / "result.json").read_text())
    assert result["derive"]["fade"] == 0 and "fade" not in result and result["resolved"]["repair"]
    assert result["method"] == "derived+kd" and not result["repair"].get("set_aside")


def test_every_command_is_one_module_with_the_same_contract() -> None:
    """A command lives in graftkd/commands/NAME.py with NAME, HELP, add_arguments and run; the parser and the
    dispatch table are built from that list, so a module left out of it fails here."""
    from pathlib import Path

    import graftkd.commands as commands
    from graftkd.cli import COMMANDS, build_parser

    modules = commands.command_modules()
    files = {p.stem for p in Path(commands.__file__).parent.glob("*.py")} - {"__init__", "common"}
    assert {m.__name__.rsplit(".", 1)[1] for m in modules} == files
    for module in modules:
        assert module.NAME.replace("-", "_") == module.__name__.rsplit(".", 1)[1]
        assert module.HELP and callable(module.add_arguments) and callable(module.run)
    assert list(COMMANDS) == [m.NAME for m in modules]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == [m.NAME for m in modules]


def test_the_command_lets_openmp_threads_sleep_on_a_busy_machine_unless_the_user_chose(tmp_path) -> None:
    """OMP_WAIT_POLICY is read when torch loads the OpenMP runtime: importing the CLI sets PASSIVE before torch is
    imported (an import hook records the variable at that moment) when other threads are runnable now, leaves the
    runtime's default on a quiet machine, even one whose 1-minute load average still counts a job that just ended,
    falls back to that average where the system gives no running count, and keeps a value the user gave."""
    import os
    import subprocess
    import sys

    from graftkd.cli import machine_is_busy, others_running

    assert machine_is_busy(1.0, 2) and machine_is_busy(3.5, 4) and not machine_is_busy(0.4, 2)
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("1.98 1.61 1.20 3/114 27184\n")
    assert others_running(str(loadavg), samples=2, interval_s=0.0) == 2.0  # this process is one of the 3
    assert others_running(str(tmp_path / "absent")) is None
    loadavg.write_text("garbled\n")
    assert others_running(str(loadavg)) is None

    def policy_at_torch_import(running: int | None, average: float, user: str | None = None) -> str:
        probe = ("import builtins, io, os, sys\n"
                 f"os.getloadavg = lambda: ({average}, {average}, {average})\n"
                 "real_open = builtins.open\n"
                 "def fake_open(file, *args, **kwargs):\n"
                 "    if file == '/proc/loadavg':\n"
                 f"        if {running} is None: raise FileNotFoundError(file)\n"
                 f"        return io.StringIO('0.00 0.00 0.00 {running}/100 1')\n"
                 "    return real_open(file, *args, **kwargs)\n"
                 "builtins.open = fake_open\n"
                 "seen = {}\n"
                 "class Spy:\n"
                 "    def find_spec(self, name, path=None, target=None):\n"
                 "        if name == 'torch':\n"
                 "            seen.setdefault('policy', os.environ.get('OMP_WAIT_POLICY'))\n"
                 "            builtins.open = real_open\n"
                 "sys.meta_path.insert(0, Spy())\n"
                 "import graftkd.cli\n"
                 "assert 'torch' in sys.modules\n"
                 "print('POLICY', seen['policy'])\n")
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if user:
            env["OMP_WAIT_POLICY"] = user
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
        return out.split("POLICY ")[1].strip()

    cores = os.cpu_count() or 1
    assert policy_at_torch_import(1 + 2 * cores, 0.0) == "PASSIVE"  # others running now
    assert policy_at_torch_import(1, 2.0 * cores) == "None"  # only itself: the high average is a job that ended
    assert policy_at_torch_import(None, 2.0 * cores) == "PASSIVE"  # no running count: the average decides
    assert policy_at_torch_import(None, 0.0) == "None"
    assert policy_at_torch_import(1 + 2 * cores, 0.0, user="ACTIVE") == "ACTIVE"


def test_distill_help_groups_every_option_by_what_it_decides(capsys) -> None:
    """`graftkd distill --help` has some 55 options: each sits in a titled group, none in argparse's catch-all."""
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    titles = ["teacher and student:", "the few-shot images:", "method:", "derived students", "grafting", "the run:"]
    at = [text.index(f"\n{title}") for title in titles]
    assert at == sorted(at)
    catch_all = text[text.index("\noptions:"):at[0]]
    assert [line.split()[0] for line in catch_all.splitlines() if line.startswith("  -")] == ["-h,"]
    for flag, group in (("--student-arch", 0), ("--k ", 1), ("--padding", 1), ("--recipe", 2), ("--fade", 3),
                        ("--block-lr", 4), ("--precision", 5), ("--seed", 5)):
        position = text.index(f"\n  {flag}")
        assert at[group] < position < (at[group + 1] if group + 1 < len(at) else len(text)), flag


def test_students_of_another_block_layout_are_listed_as_fresh_only_on_request() -> None:
    from graftkd.students import fitting_students

    teacher = build_model("wrn_16_2").eval()
    every = {f.arch: f for f in fitting_students(teacher, "wrn_16_2", (3, 32, 32), 10, fresh_only=True)}
    assert every["resnet20"].derivable == "fresh only" and "pairing" in every["resnet20"].why
    assert every["resnet8"].derivable == "no"  # grafts block by block, not derivable: what auto may still choose
    # not graftable (its first unit's shortcut), but blocks 2-3 derive and patient KD trains block 1
    assert every["wrn_16_1"].derivable == "partly (blocks 2,3 of 3, the others fresh)"
    assert all(f.params < 0.69e6 for f in every.values())
