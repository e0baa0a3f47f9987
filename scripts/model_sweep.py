"""Sweeps timm and torchvision models through `build(..., splits="auto")` in ilr2 and hier4 and sorts each
outcome: works (every head exports strictly into the original class with the collaborative output), refused
(one line, ValueError), raw (any other exception, or a message of several lines), degenerate (built, but a
head level holds no layer of its own, or an export differs from the collaborative output).

    python scripts/model_sweep.py                  # the whole list (~15 min on 2 cores), table to stdout
    python scripts/model_sweep.py --subset ci      # the representative subset CI runs
    python scripts/model_sweep.py --json out.json  # every row, for the README's counts

Needs timm and a torchvision built for the installed torch (CI's stage-4 environment)."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

# One spec per family, the smallest variant where a family has several; "tv:" is torchvision.
TIMM = ["resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "resnest14d", "res2net50_14w_8s", "dla34",
        "dpn68b", "densenet121", "vgg11", "inception_v3", "inception_v4", "xception41", "cspresnet50",
        "cspdarknet53", "darknet17", "regnetx_002", "regnety_008", "efficientnet_b0", "efficientnetv2_rw_t",
        "mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv4_conv_small", "mnasnet_050", "tinynet_e",
        "lcnet_050", "ghostnet_100", "ghostnetv2_100", "rexnet_100", "hardcorenas_a", "repvgg_a0", "mobileone_s0",
        "repvit_m0_9", "fastvit_t8", "efficientvit_b0", "convnext_atto", "convnextv2_atto", "nf_resnet26",
        "ese_vovnet19b_dw", "selecsls42b", "hrnet_w18_small", "poolformer_s12", "edgenext_xx_small",
        "mobilevit_xxs", "tiny_vit_5m_224", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
        "eva02_tiny_patch14_224", "beit_base_patch16_224", "cait_xxs24_224", "convit_tiny", "levit_128s",
        "mixer_s32_224", "resmlp_12_224", "gmlp_ti16_224", "pvt_v2_b0", "twins_svt_small", "swin_tiny_patch4_window7_224",
        "coatnet_nano_rw_224", "maxvit_nano_rw_256", "hiera_tiny_224", "efficientformer_l1", "xcit_nano_12_p16_224",
        "crossvit_tiny_240", "sequencer2d_s"]
TORCHVISION = ["resnet18", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
               "efficientnet_b0", "efficientnet_v2_s", "mnasnet0_5", "regnet_y_400mf", "shufflenet_v2_x0_5",
               "squeezenet1_0", "densenet121", "googlenet", "inception_v3", "vgg11", "alexnet", "convnext_tiny",
               "vit_b_16", "swin_t", "swin_v2_t", "maxvit_t"]
SPECS = [f"timm:{n}" for n in TIMM] + [f"torchvision:{n}" for n in TORCHVISION]
# CI's subset: one of each way a model reaches the split (children in order, the token adapter, a traced graph
# for token pooling, NHWC stages, a ModuleList, a distillation head, densely named Sequential) and a refusal.
CI = ["timm:resnet18", "timm:convnext_atto", "timm:vit_tiny_patch16_224", "timm:deit_tiny_distilled_patch16_224",
      "timm:eva02_tiny_patch14_224", "timm:mixer_s32_224", "timm:hrnet_w18_small", "torchvision:densenet121",
      "torchvision:vit_b_16", "torchvision:swin_t", "torchvision:shufflenet_v2_x0_5", "torchvision:efficientnet_b0"]
CI_OUTCOME: dict[tuple[str, str], str] = {}  # (spec, pattern) -> outcome where it is not "works"


def _original(arch: str, num_classes: int, **kwargs):
    lib, name = arch.split(":")
    if lib == "timm":
        import timm

        return timm.create_model(name, num_classes=num_classes, **kwargs)
    import torchvision

    return torchvision.models.get_model(name, num_classes=num_classes, **kwargs)


def _input_size(net: torch.nn.Module) -> tuple[int, ...]:
    size = (getattr(net, "pretrained_cfg", None) or {}).get("input_size")
    if size:
        return tuple(size)
    return (3, 299, 299) if type(net).__name__ in ("Inception3",) else (3, 224, 224)


def one(arch: str, pattern: str) -> dict:
    from collab_fast.models import build
    from collab_fast.models.collab import CollabNet

    row = {"arch": arch, "pattern": pattern}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    try:
        model = build(arch, pattern, num_classes=10)
    except ValueError as exc:
        text = str(exc)
        row.update(outcome="refused" if "\n" not in text.strip() else "raw", why=text.strip().splitlines()[0][:300])
        return row
    except Exception as exc:  # noqa: BLE001 - a raw error is what the sweep counts
        row.update(outcome="raw", why=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}")
        return row
    assert isinstance(model, CollabNet)
    row.update(splits=model.splits, path=getattr(model, "split_by", "children"))
    thin = model.thin_levels() if hasattr(model, "thin_levels") else []
    try:
        x = torch.randn(2, *_input_size(_original(arch, 10)), generator=torch.Generator().manual_seed(1))
        model.eval()
        with torch.no_grad():
            out = model(x)
            worst = 0.0
            for k in range(model.num_heads):
                fresh = _original(arch, 10).eval()
                head = model.export_head(k)
                if type(head) is not type(fresh):
                    raise TypeError(f"head {k} exports as {type(head).__name__}, not {type(fresh).__name__}")
                fresh.load_state_dict(head.state_dict(), strict=True)
                worst = max(worst, (fresh(x) - out[k]).abs().max().item())
    except Exception as exc:  # noqa: BLE001
        row.update(outcome="raw", why=f"after building: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
        return row
    row["export_max_diff"] = worst
    if worst > 1e-3 or thin:
        row.update(outcome="degenerate", why=f"export differs by {worst:.3g}" if worst > 1e-3 else f"thin {thin}")
    else:
        row["outcome"] = "works"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _environment(argv) -> dict:
    import platform

    import timm
    import torchvision

    return {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "torch": torch.__version__, "timm": timm.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "command": " ".join(["python scripts/model_sweep.py", *(argv if argv is not None else sys.argv[1:])])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subset", choices=["all", "ci"], default="all")
    p.add_argument("--only", nargs="*", help="these specs only")
    p.add_argument("--patterns", nargs="*", default=["ilr2", "hier4"])
    p.add_argument("--json", help="write every row here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    specs = args.only or (CI if args.subset == "ci" else SPECS)
    rows = []
    for arch in specs:
        for pattern in args.patterns:
            row = one(arch, pattern)
            rows.append(row)
            print(f"{row['outcome']:10s} {pattern:5s} {arch:45s} {row.get('path', ''):8s} {row.get('splits', '')} "
                  f"{row.get('why', '')}", flush=True)
            gc.collect()
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    both = {a for a in specs if all(r["outcome"] == "works" for r in rows if r["arch"] == a)}
    print(f"\n{len(specs)} specs, {len(rows)} builds: {counts}; working in every pattern: {len(both)}/{len(specs)} "
          f"({100 * len(both) / len(specs):.0f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": _environment(argv), "specs": len(specs), "counts": counts,
                       "working_specs": len(both), "rows": rows}, f, indent=1)
    return 0 if not counts.get("raw") and not counts.get("degenerate") else 1


if __name__ == "__main__":
    sys.exit(main())
