"""Custom kernels (docs/KERNELS.md): each file holds the math, a PyTorch reference, the Triton kernel,
its launcher and the autograd function. Switch: KLONG_KERNELS=auto|triton|reference or impl=."""
from kernels.fused_loss import backend, token_logprobs, weighted_logprob_sum
from kernels.masked_attention import allowed, masked_attention, register_hf

__all__ = ["backend", "token_logprobs", "weighted_logprob_sum", "allowed", "masked_attention", "register_hf"]
