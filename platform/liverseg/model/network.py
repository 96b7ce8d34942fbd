"""U-Net factory (segmentation-models-pytorch): encoder by name, weights by name or local file."""

from __future__ import annotations

from pathlib import Path

import torch

from liverseg.core.errors import ModelError

NUM_CLASSES = 2  # background, liver (label >= 1); softmax over these


def encoder_names() -> list[str]:
    import segmentation_models_pytorch as smp

    return sorted(smp.encoders.get_encoder_names())


def build_model(
    encoder: str = "resnet50",
    encoder_weights: str = "none",
    in_channels: int = 1,
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
) -> torch.nn.Module:
    """smp.Unet with `NUM_CLASSES` outputs. Input (N, in_channels, H, W) float, H and W multiples of 32.

    encoder_weights: 'imagenet' (downloaded once; needs a network), 'none', or a path to a state dict of
    the encoder (.pt/.pth, loaded with weights_only=True).
    """
    import segmentation_models_pytorch as smp

    names = encoder_names()
    if encoder not in names:
        raise ModelError(f"model.encoder: unknown encoder '{encoder}'; valid: {', '.join(names)}")
    local = None
    if encoder_weights in ("none", "", None):
        weights = None
    elif encoder_weights == "imagenet":
        weights = "imagenet"
    else:
        local = Path(encoder_weights)
        if not local.is_file():
            raise ModelError(
                f"model.encoder_weights: '{encoder_weights}' is neither 'imagenet', 'none' nor an existing file"
            )
        weights = None
    try:
        model = smp.Unet(
            encoder_name=encoder,
            encoder_weights=weights,
            in_channels=in_channels,
            classes=NUM_CLASSES,
            decoder_channels=tuple(decoder_channels),
        )
    except Exception as e:
        if weights == "imagenet":
            raise ModelError(
                f"model.encoder_weights=imagenet: cannot fetch {encoder} weights ({type(e).__name__}); "
                "use 'none' or a local file when offline"
            ) from None
        raise
    if local is not None:
        state = torch.load(local, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        own = model.encoder.state_dict()
        for k, v in list(state.items()):  # ImageNet RGB stem -> grey stem: sum over channels, as smp does
            if k in own and v.ndim == 4 and v.shape[1] != own[k].shape[1] and own[k].shape[1] == in_channels:
                state[k] = v.sum(1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels
        matched = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        if not matched:
            raise ModelError(f"model.encoder_weights: {local} holds no weights of encoder '{encoder}'")
        torch.nn.Module.load_state_dict(model.encoder, matched, strict=False)  # classifier keys are skipped
    return model
