"""Architectures and collaborative patterns: `build(arch, pattern, num_classes=..., rescale=...)`.

    from collab_fast.models import build
    model = build("resnet50", "hier4", num_classes=1000)   # CollabNet: model(x) -> [4, N, 1000]
    net = model.export_head(0)                             # a plain ResNet-50 (torchvision names)

`make_collaborative(factory, pattern, splits=[...])` does the same for any network whose forward runs its
named children in order (a user's model, a torchvision or timm model where those import).
"""

from collab_fast.models.builder import (
    ModelConfig,
    build,
    build_model,
    check_input_size,
    make_collaborative,
    parse_model_kwargs,
    reinit_classifier,
)
from collab_fast.models.collab import BEFORE_ALL, CollabNet, parse_pattern
from collab_fast.models.heads import as_heads
from collab_fast.models.registry import (
    ARCHS,
    EXTERNAL_PREFIXES,
    default_splits,
    input_channels,
    is_builtin_resnet,
    native_image_size,
)

__all__ = ["ARCHS", "BEFORE_ALL", "EXTERNAL_PREFIXES", "CollabNet", "ModelConfig", "as_heads", "build", "build_model",
           "check_input_size", "default_splits", "input_channels", "is_builtin_resnet", "make_collaborative",
           "native_image_size", "parse_model_kwargs", "parse_pattern", "reinit_classifier"]
