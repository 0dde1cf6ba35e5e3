"""What plain transformers computes, to compare the node's outputs with."""

from __future__ import annotations


def hf_layers(model):
    """The decoder layers of a transformers causal LM, whatever the family calls them."""
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.h


def hf_blocks(model, hidden, start: int, end: int, prompts=None):
    """Reference: transformers' layers [start, end) applied to `hidden` (deep prompts added before each)."""
    import torch

    captured = {}
    hooks = []
    layers = hf_layers(model)

    def replace_input(module, args, kwargs):
        return (hidden,) + tuple(args[1:]), kwargs

    def add_prompt(i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            p = prompts[i - start]
            h = torch.cat([h[:, : p.shape[-2]] + p, h[:, p.shape[-2] :]], dim=1)
            if args:
                return (h,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = h
            return args, kwargs

        return hook

    hooks.append(layers[start].register_forward_pre_hook(replace_input, with_kwargs=True))
    if prompts is not None:
        for i in range(start, end):
            hooks.append(layers[i].register_forward_pre_hook(add_prompt(i), with_kwargs=True))
    hooks.append(
        layers[end - 1].register_forward_hook(
            lambda m, a, out: captured.__setitem__("out", out[0] if isinstance(out, tuple) else out)
        )
    )
    try:
        model(inputs_embeds=torch.zeros_like(hidden), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured["out"]


def rel_err(a, b) -> float:
    """Largest difference relative to the reference `b`'s largest magnitude (in float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
