"""Writes collab_fast/models/torchvision_resnet_manifest.json: state-dict keys and shapes of torchvision's
ResNets, so that tests can check name-for-name compatibility where torchvision cannot be imported.

    python scripts/make_torchvision_manifest.py                      # torchvision imports here
    python scripts/make_torchvision_manifest.py --source DIR         # DIR/torchvision/models/resnet.py

With --source the file torchvision/models/resnet.py of an unpacked torchvision wheel is executed with its
package-relative imports stubbed (the network definition itself is torchvision's, unchanged). This is how
the committed manifest was made here, where torchvision's CUDA build cannot import with a CPU torch.
"""

import argparse
import enum
import importlib.util
import json
import sys
import types
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "collab_fast" / "models" / "torchvision_resnet_manifest.json"
ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def load_from_source(src: Path):
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    class WeightsEnum(enum.Enum):
        @classmethod
        def verify(cls, obj):
            return obj

    module("tvstub", __path__=[])
    module("tvstub.transforms", __path__=[])
    module("tvstub.transforms._presets", ImageClassification=object)
    module("tvstub.utils", _log_api_usage_once=lambda *a, **k: None)
    module("tvstub.models", __path__=[])
    module("tvstub.models._api", register_model=lambda *a, **k: (lambda f: f),
           Weights=lambda **k: types.SimpleNamespace(**k), WeightsEnum=WeightsEnum)
    module("tvstub.models._meta", _IMAGENET_CATEGORIES=[])
    module("tvstub.models._utils", _ovewrite_named_param=lambda *a, **k: None,
           handle_legacy_interface=lambda **k: (lambda f: f))
    spec = importlib.util.spec_from_file_location("tvstub.models.resnet", src / "torchvision/models/resnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--source", type=Path, help="directory holding torchvision/models/resnet.py")
    p.add_argument("--version", default=None, help="torchvision version of --source (recorded)")
    args = p.parse_args()
    if args.source:
        resnet, version, how = load_from_source(args.source), args.version, "resnet.py executed from source"
    else:
        import torchvision
        import torchvision.models as resnet

        version, how = torchvision.__version__, "imported"
    manifest = {"torchvision": version, "how": how, "models": {}}
    for arch in ARCHS:
        sd = getattr(resnet, arch)(weights=None).state_dict()
        manifest["models"][arch] = {k: list(v.shape) for k, v in sd.items()}
    lines = [f'{{"torchvision": {json.dumps(version)}, "how": {json.dumps(how)}, "models": {{']
    for i, (arch, keys) in enumerate(manifest["models"].items()):
        lines.append(f" {json.dumps(arch)}: {{")
        lines += [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in keys.items()]
        lines[-1] = lines[-1].rstrip(",")
        lines.append(" }" + ("," if i < len(ARCHS) - 1 else ""))
    lines.append("}}")
    OUT.write_text("\n".join(lines) + "\n")  # one key per line: reviewable diffs
    print(f"wrote {OUT} ({', '.join(f'{a}: {len(m)} keys' for a, m in manifest['models'].items())})")


if __name__ == "__main__":
    main()
