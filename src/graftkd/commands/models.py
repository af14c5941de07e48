"""`graftkd models`: the zoo, with parameters, FLOPs and blocks."""
from __future__ import annotations

import argparse


NAME = "models"
HELP = "list the zoo with parameters, FLOPs and blocks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-classes", type=int, default=10, help="classes of the models' heads, for parameters and FLOPs (default: 10)")


def run(args) -> None:
    from graftkd.models import build_model, list_models
    from graftkd.models.profile import count_flops, count_params, format_count

    print(f"{'model':<16} {'input':<9} {'params':>8} {'FLOPs':>8}  blocks")
    for name in list_models():
        if name == "hybrid":  # built from a teacher, a student and --replace, not on its own
            continue
        model = build_model(name, num_classes=args.num_classes)
        shape = tuple(getattr(model, "input_shape", (3, 32, 32)))
        flops = count_flops(model, shape)  # torch.utils.flop_counter: a multiply-add counts 2
        size = "x".join(map(str, shape))
        print(f"{name:<16} {size:<9} {format_count(count_params(model)):>8} {format_count(flops):>8}  "
              f"{', '.join(model.block_names())}")
