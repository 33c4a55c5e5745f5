"""``with_precision(model, "bf16-weights")`` makes the model's bfloat16 copy once and reuses it on later calls
(the infer stage and ``upscale`` call it once per image), with the same outputs; a change to the model's weights
makes a new copy."""
import torch
from torch.nn.modules.module import register_module_forward_hook

from smt.infer.precision import with_precision
from smt.models import HAT, build_model


def _net():
    torch.manual_seed(0)
    return build_model("hat_tiny").eval()


def _x():
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _run(net, x):
    """(the model that ran, output) of one ``bf16-weights`` call."""
    seen = []
    handle = register_module_forward_hook(lambda m, args, out: seen.append(m) if isinstance(m, HAT) else None)
    try:
        with torch.no_grad():
            out = with_precision(net, "bf16-weights")(x)
    finally:
        handle.remove()
    (ran,) = seen
    return ran, out


def test_bf16_weights_copy_is_made_once_per_model_and_reused_with_the_same_outputs():
    net, x = _net(), _x()
    copy1, out1 = _run(net, x)
    copy2, out2 = _run(net, x)
    assert copy2 is copy1 and copy1 is not net and copy1.conv_first.weight.dtype == torch.bfloat16
    assert torch.equal(out1, out2)
    _, fresh = _run(_net(), x)  # a new model's own copy: the same bits as the reused one
    assert torch.equal(fresh, out1)
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_bf16_weights_copy_is_remade_when_the_model_weights_change():
    net, x = _net(), _x()
    copy1, out1 = _run(net, x)
    with torch.no_grad():
        net.conv_first.weight.mul_(1.5)  # in place (as load_state_dict and optimiser steps are)
    copy2, out2 = _run(net, x)
    assert copy2 is not copy1 and not torch.equal(out1, out2)
    assert torch.equal(copy2.conv_first.weight, net.conv_first.weight.bfloat16())
    net.conv_first.weight = torch.nn.Parameter(net.conv_first.weight.detach() * 2)  # a new tensor
    copy3, _ = _run(net, x)
    assert copy3 is not copy2 and torch.equal(copy3.conv_first.weight, net.conv_first.weight.bfloat16())
    copy4, _ = _run(net, x)
    assert copy4 is copy3


def test_bf16_weights_cache_keeps_no_replaced_parameter_alive():
    import weakref

    net, x = _net(), _x()
    _run(net, x)
    old = weakref.ref(net.conv_first.weight)
    net.conv_first.weight = torch.nn.Parameter(net.conv_first.weight.detach() * 2)  # the old tensor's last user
    assert old() is None  # the cache's key does not hold it (the copy's own weights are separate tensors)
    copy2, _ = _run(net, x)
    assert torch.equal(copy2.conv_first.weight, net.conv_first.weight.bfloat16())
