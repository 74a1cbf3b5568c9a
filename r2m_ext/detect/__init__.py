"""The detector workflow on top of merging: checkpoint layouts, evaluation (`r2m eval`), and the
built-in synthetic deepfake benchmark that `make demo` runs. This module imports nothing, so the
CLI can describe `r2m eval` without loading the detector stack."""

BUILTIN_SPEC = "r2m-vit"
# The detector networks `r2m eval --model SPEC` builds (detect/evaluate.py, load_detector).
SPEC_FORMS = f"""\
- `{BUILTIN_SPEC}`: the built-in CLIP-style ViT, its sizes read from the checkpoint's shapes;
- `timm:NAME`: `timm.create_model(NAME, pretrained=False, num_classes=2)` (timm installed);
- `transformers:MODEL_TYPE`: an image-classification model built from that config type with
  2 labels, no download (transformers installed);
- `module:function`: the user's own code; the function returns an `nn.Module` mapping images
  [B, 3, S, S] to logits [B, 2] (softmax, class 1 = fake) or [B, 1] (sigmoid). The module may set
  `input_size` (S) and `mean`/`std` (per-channel normalisation); otherwise images keep their
  size and stay in [0, 1].
"""
