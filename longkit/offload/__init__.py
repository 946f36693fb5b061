"""Activation offload: the tensors autograd saves for backward, per decoder layer, to host memory and back.

    from longkit.offload import ActivationOffloader, offload_activations
    from longkit.config import ActivationOffloadConfig

    offloader = ActivationOffloader(model, ActivationOffloadConfig(min_tensor_bytes=1 << 20))
    loss = model(**batch).loss; loss.backward()        # layers' saved tensors went to pinned host buffers
    offloader.stats()["bytes_offloaded_last_forward"]
    offloader.remove()

    with offload_activations(model, gpu_fraction=0.25):  # the same, undone at the end of the block
        ...

Works with and without gradient checkpointing (HF ``model.gradient_checkpointing_enable()``; then each layer's
checkpointed input is what gets offloaded), with DeepSpeed ZeRO 1-3 and Ulysses (the DeepSpeed ``"longkit"``
section's ``"activation_offload"`` installs it), and with HF ``Trainer`` (install on the model before training).
``install(model, cfg)`` / ``uninstall(model, undo)`` follow ``apply_patches``'s technique protocol.
Imports no host library besides torch.
"""

from ..config import ActivationOffloadConfig
from .activation import NO_CUDA_WARNING, ActivationOffloader, get_offloader, install, offload_activations, uninstall
from .layers import find_decoder_layers
from .pool import HostBufferPool

__all__ = [
    "ActivationOffloader",
    "ActivationOffloadConfig",
    "offload_activations",
    "install",
    "uninstall",
    "get_offloader",
    "find_decoder_layers",
    "HostBufferPool",
    "NO_CUDA_WARNING",
]
