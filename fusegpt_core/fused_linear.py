"""The fused linear layer: a block's own linear plus the weights of removed blocks, mixed in
through learnable low-rank coefficients (FuseGPT, arXiv 2411.14507, eq. for W_eff).

    W_eff = W + B A + sum_k (C_k D_k) * W_k          (* is elementwise)
    b_eff = b + sum_k c_k * b_k

W is the frozen base weight, B A an optional LoRA on it, W_k the frozen weight of the k-th block
absorbed into this one, C_k D_k its rank-r coefficient matrix. C_k, B and c_k start at zero, so a
freshly fused layer computes exactly what the base layer did. Works for nn.Linear (weight
(out, in)) and GPT-2's Conv1D (weight (in, out)): every term has the base weight's layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def donor_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) a removed block's linear contributes: its own, shared, for a plain layer; its
    effective ones, built once, for a layer that absorbed blocks of earlier rounds."""
    if isinstance(layer, FusedLinear):
        return layer.effective_weight(), layer.effective_bias()
    return layer.weight.detach(), (layer.bias.detach() if getattr(layer, "bias", None) is not None else None)


class FusedLinear(nn.Module):
    """Wraps `base_layer` (kept as is, frozen); trainable parts are fp32 parameters."""

    def __init__(
        self, base_layer: nn.Module, lora_rank: int = 0, conv1d: bool = False, generator=None, keep_fold: bool = True
    ):
        super().__init__()
        self.base_layer = base_layer
        self.conv1d = conv1d
        # keep the CPU fold (see folded_weight); off where memory is what counts (offloaded blocks)
        self.keep_fold = keep_fold
        for p in base_layer.parameters():
            p.requires_grad_(False)
        rows, cols = base_layer.weight.shape  # (out, in) for nn.Linear, (in, out) for Conv1D
        device = base_layer.weight.device
        self.lora_rank = lora_rank
        if lora_rank > 0:
            # B starts at zero so the LoRA adds nothing until trained
            # kaiming_uniform_(a=sqrt 5) on A: bound 1/sqrt(fan_in), from our generator for determinism
            bound = 1.0 / math.sqrt(cols)
            a = torch.empty(lora_rank, cols, device=device).uniform_(-bound, bound, generator=generator)
            self.lora_A = nn.Parameter(a)  # (rank, cols)
            self.lora_B = nn.Parameter(torch.zeros(rows, lora_rank, device=device))  # (rows, rank)
            self.lora_A.requires_grad_(False)  # frozen until a round trains this group
            self.lora_B.requires_grad_(False)
        self.coef_C = nn.ParameterList()  # each (rows, r), zero-initialised
        self.coef_D = nn.ParameterList()  # each (r, cols), kaiming-uniform
        self.bias_coef = nn.ParameterList()  # each (bias_len,), zero-initialised
        self.num_absorbed = 0
        self.num_settled = 0  # absorbed terms whose coefficients a finished round already trained
        # (key, weight, bias) of what folded_weight last folded without a graph (CPU only)
        self._frozen_cache: tuple | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, so code that reads `.weight` sees what the layer computes."""
        return self.effective_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.effective_bias()

    def absorb(self, other: nn.Module, coef_rank: int, fuse_bias: bool = True, generator=None) -> None:
        """Inject the (effective) weight of the same linear of a removed block."""
        weight, bias = donor_weights(other)
        self.absorb_weights(weight, bias, coef_rank, fuse_bias, generator)

    def absorb_weights(
        self, weight: torch.Tensor, bias: torch.Tensor | None, coef_rank: int, fuse_bias: bool = True, generator=None
    ) -> None:
        """Inject a removed block's weight (and bias) as computed by donor_weights. The tensors are
        kept as they are, not copied: one donor's weights serve every target it is fused into."""
        if weight.shape != self.base_layer.weight.shape:
            raise ValueError(f"cannot fuse weight {tuple(weight.shape)} into {tuple(self.base_layer.weight.shape)}")
        k = self.num_absorbed
        rows, cols = weight.shape
        device = self.base_layer.weight.device
        rank = min(coef_rank, rows, cols)
        # W_k (rows, cols), frozen; C_k (rows, r) starts at zero so the layer computes what it did
        self.register_buffer(f"absorbed_weight_{k}", weight.detach().to(device), persistent=False)
        self.coef_C.append(nn.Parameter(torch.zeros(rows, rank, device=device)))
        d = torch.empty(rank, cols, device=device)  # D_k (r, cols)
        # kaiming_uniform_(a=sqrt 5): bound = 1/sqrt(fan_in), drawn from our own generator for determinism
        bound = 1.0 / math.sqrt(cols)
        d.uniform_(-bound, bound, generator=generator)
        self.coef_D.append(nn.Parameter(d))
        base_bias = getattr(self.base_layer, "bias", None)
        has_bias = fuse_bias and bias is not None and base_bias is not None
        self.register_buffer(f"absorbed_bias_{k}", bias.detach().to(device) if has_bias else None, persistent=False)
        self.bias_coef.append(nn.Parameter(torch.zeros(bias.shape[0] if has_bias else 0, device=device)))
        for p in (self.coef_C[k], self.coef_D[k], self.bias_coef[k]):
            p.requires_grad_(False)  # frozen until a round trains this group
        self.num_absorbed += 1

    def delta_weight(self) -> torch.Tensor:
        """B A + sum_k (C_k D_k) * W_k, in fp32, shaped like the base weight."""
        return self._delta(lora=True, terms=range(self.num_absorbed))

    def _delta(self, lora: bool, terms) -> torch.Tensor:
        """The LoRA product (when `lora`) plus the absorbed terms numbered in `terms`, in fp32."""
        base = self.base_layer.weight
        delta = torch.zeros(base.shape, device=base.device, dtype=torch.float32)  # (rows, cols)
        if lora and self.lora_rank > 0:
            delta = delta + self.lora_B @ self.lora_A  # (rows, rank) @ (rank, cols)
        for k in terms:
            absorbed = getattr(self, f"absorbed_weight_{k}").float()
            delta = delta + (self.coef_C[k] @ self.coef_D[k]) * absorbed  # (rows, r) @ (r, cols), elementwise W_k
        return delta

    @torch.no_grad()
    def term_share(self, k: int) -> float:
        """||(C_k D_k) * W_k|| / ||W||: how much of absorbed block k this layer carries, relative to
        its own weight (Frobenius norms; 0 right after absorbing, as C_k starts at zero)."""
        base = self.base_layer.weight.float()
        term = self._delta(lora=False, terms=[k])
        return (term.norm() / base.norm().clamp_min(1e-12)).item()

    def delta_bias(self) -> torch.Tensor | None:
        base_bias = getattr(self.base_layer, "bias", None)
        if base_bias is None:
            return None
        delta = torch.zeros(base_bias.shape, device=base_bias.device, dtype=torch.float32)
        for k in range(self.num_absorbed):
            absorbed = getattr(self, f"absorbed_bias_{k}")
            if absorbed is not None:
                delta = delta + self.bias_coef[k] * absorbed.float()
        return delta

    def effective_weight(self) -> torch.Tensor:
        base = self.base_layer.weight
        return (base.float() + self.delta_weight()).to(base.dtype)

    def effective_bias(self) -> torch.Tensor | None:
        base_bias = getattr(self.base_layer, "bias", None)
        if base_bias is None:
            return None
        return (base_bias.float() + self.delta_bias()).to(base_bias.dtype)

    def folded_weight(self) -> torch.Tensor:
        """W_eff in the base weight's dtype, without a graph: what forward multiplies by.

        On CPU what cannot change during a call is folded once and kept: rebuilding W_eff costs
        about as much as a small batch's matmuls, scoring and teacher passes run frozen layers many
        times, and a training step needs W_eff twice (forward and backward). The terms that train
        (their parameters require grad) are added to that kept part at each call. On GPUs the
        rebuild is cheap and memory is the scarce resource: nothing is kept. With keep_fold off (offloaded
        blocks) the CPU computes the same sums and keeps nothing either."""
        base = self.base_layer.weight
        if base.device.type != "cpu":
            self._frozen_cache = None
            with torch.no_grad():
                return (base.float() + self.delta_weight()).to(base.dtype)
        lora_trains = any(p.requires_grad for p in self._lora_params())
        training = [k for k in range(self.num_absorbed) if any(p.requires_grad for p in self._term_params(k))]
        if not lora_trains and not training:
            weight, _ = self._cached(list(self.parameters()), lambda: (self.effective_weight(), None))
            return weight
        frozen = [k for k in range(self.num_absorbed) if k not in training]
        depends_on = [base, *(p for k in frozen for p in self._term_params(k))]
        if not lora_trains:
            depends_on += self._lora_params()
        # fp32: base + the frozen terms (+ the LoRA when it is frozen), kept; then the training terms
        fixed, _ = self._cached(
            depends_on,
            lambda: (base.float() + self._delta(lora=not lora_trains, terms=frozen), None),
            tag=(tuple(training), lora_trains),
        )
        with torch.no_grad():
            return (fixed + self._delta(lora=lora_trains, terms=training)).to(base.dtype)

    def _cached(self, depends_on: list[torch.Tensor], compute, tag: tuple = ()):
        """compute()'s (weight, bias) without a graph, computed again only when a tensor it depends on
        changed (an optimiser step or a load bumps a parameter's version; moving the module changes
        its storage) or `tag` (which parts train) did."""
        if not self.keep_fold:  # the same sums, nothing kept
            self._frozen_cache = None
            with torch.no_grad():
                return compute()
        key = (tag, self.num_absorbed, tuple((t.data_ptr(), t._version) for t in depends_on))
        if self._frozen_cache is None or self._frozen_cache[0] != key:
            self._frozen_cache = None  # the old fold goes before the new one is built
            with torch.no_grad():
                self._frozen_cache = (key, *compute())
        return self._frozen_cache[1], self._frozen_cache[2]

    def weight_parts(self) -> list[nn.Parameter]:
        """The parameters W_eff is built from besides the base weight, in a fixed order: the LoRA's
        A and B (when there is one), then C_k and D_k of each absorbed term."""
        parts = list(self._lora_params())
        for k in range(self.num_absorbed):
            parts += [self.coef_C[k], self.coef_D[k]]
        return parts

    def _term_params(self, k: int) -> tuple[nn.Parameter, ...]:
        return (self.coef_C[k], self.coef_D[k], self.bias_coef[k])

    def _lora_params(self) -> tuple[nn.Parameter, ...]:
        return (self.lora_A, self.lora_B) if self.lora_rank > 0 else ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.weight_parts()
        if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
            out = _FusedMatmul.apply(x, self, *parts)
        else:
            out = _matmul(x, self.folded_weight().to(x.dtype), self.conv1d)
        bias = self.effective_bias()  # small: plain autograd, with a graph when its coefficients train
        return out if bias is None else out + bias.to(x.dtype)

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """(new fusion coefficients, coefficients settled by earlier rounds, LoRA matrices)."""

        def coefs(ks):
            return [p for k in ks for p in (self.coef_C[k], self.coef_D[k], self.bias_coef[k]) if p.numel() > 0]

        new = coefs(range(self.num_settled, self.num_absorbed))
        settled = coefs(range(self.num_settled))
        lora = [self.lora_A, self.lora_B] if self.lora_rank > 0 else []
        return new, settled, lora

    def settle(self) -> None:
        """Mark every absorbed term as trained (called when a round ends)."""
        self.num_settled = self.num_absorbed

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold everything into the base layer (computed in fp32) and return it: a stock module. The
        folded weight is a new tensor: the base weight may be shared with the input model."""
        base = self.base_layer
        weight, bias = self.effective_weight(), self.effective_bias()
        base.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            base.bias = nn.Parameter(bias, requires_grad=False)
        return base


def fold_fused_linears(module: nn.Module) -> int:
    """Replace every FusedLinear below `module` by its merged base layer; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, FusedLinear):
            setattr(module, name, child.merge())
            count += 1
        else:
            count += fold_fused_linears(child)
    return count


def _matmul(x: torch.Tensor, weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """x (..., in) times a weight in its layer's layout: (out, in) for nn.Linear, (in, out) for Conv1D."""
    return x @ weight if conv1d else F.linear(x, weight)


class _FusedMatmul(torch.autograd.Function):
    """x times W_eff with gradients for the coefficients and the LoRA, keeping for backward only x
    and the small trainable matrices. Plain autograd through W_eff = W + B A + sum_k (C_k D_k) * W_k
    would keep an fp32 copy of every absorbed W_k (bf16 models) and W_eff itself, each as large as
    the layer; here backward rebuilds W_eff (kept on CPU, see folded_weight) and reads the W_k the
    layer already holds.

    With G = dL/dW_eff (rows, cols) in the base weight's layout:
        dL/dB = G A^T,  dL/dA = B^T G,  dL/dC_k = (G * W_k) D_k^T,  dL/dD_k = C_k^T (G * W_k)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: FusedLinear, *parts: torch.Tensor) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, *parts)
        return _matmul(x, layer.folded_weight().to(x.dtype), layer.conv1d)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *parts = ctx.saved_tensors
        layer: FusedLinear = ctx.layer
        weight = layer.folded_weight().to(grad_out.dtype)  # (rows, cols), rebuilt rather than saved
        needs = ctx.needs_input_grad
        grad_x = None
        if needs[0]:
            grad_x = grad_out @ weight.t() if layer.conv1d else grad_out @ weight  # (..., in)
        del weight
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        xs = x.reshape(-1, x.shape[-1])  # (tokens, in)
        grad_w = (xs.t() @ g if layer.conv1d else g.t() @ xs).float()  # (rows, cols), dL/dW_eff
        grads: list[torch.Tensor | None] = [None] * len(parts)
        i = 0
        if layer.lora_rank > 0:
            lora_a, lora_b = parts[0], parts[1]
            if needs[2]:
                grads[0] = lora_b.t() @ grad_w  # (rank, cols)
            if needs[3]:
                grads[1] = grad_w @ lora_a.t()  # (rows, rank)
            i = 2
        for k in range(layer.num_absorbed):
            c, d = parts[i], parts[i + 1]
            if needs[2 + i] or needs[3 + i]:
                masked = grad_w * getattr(layer, f"absorbed_weight_{k}")  # (rows, cols), fp32
                if needs[2 + i]:
                    grads[i] = masked @ d.t()  # (rows, r)
                if needs[3 + i]:
                    grads[i + 1] = c.t() @ masked  # (r, cols)
                del masked
            i += 2
        return grad_x, None, *grads
