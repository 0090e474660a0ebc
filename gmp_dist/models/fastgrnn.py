"""FastGRNN (Kusupati et al. 2018) for HAR-2: the paper's structured-pruning experiment (Table 6).

Parametrisation — Microsoft EdgeML's ``FastGRNNCell`` with ``wRank``/``uRank``, TensorFlow
version (``tf/edgeml/graph/rnn.py``), which computes row vectors times matrices::

    W1: [input_size, wRank]   W2: [wRank, hidden]     W = W1 @ W2   (x_t @ W1 @ W2)
    U1: [hidden, uRank]       U2: [uRank, hidden]     U = U1 @ U2   (h @ U1 @ U2)
    z_t  = sigmoid(x_t W + h_{t-1} U + b_g)
    h~_t = tanh(x_t W + h_{t-1} U + b_h)
    h_t  = z_t * h_{t-1} + (sigmoid(zeta) * (1 - z_t) + sigmoid(nu)) * h~_t

Init as in EdgeML: factors ~ 0.1*N(0,1), both biases 1, zeta 1, nu -4. (EdgeML's PyTorch port
stores the transposes, W1: [wRank, input], and multiplies by ``W1^T``; same function.)

In this layout the **columns** of ``W1`` (9 of them, r_W) and of ``U1`` (80, r_U) index the rank:
zeroing column k of W1 removes the rank-one term W1[:, k] W2[k, :]. The paper (§HAR-2) prunes
"the columns of W1 (9) and W2 (80)"; we read its "W2 (80)" as the 80-column U factor, since the
table labels the result (r_W, r_U). Structured pruning therefore takes ranks for ``cell.W1``
and ``cell.U1`` (see ``gmp_dist.pruning.structured.column_masks``).

HAR-2 input: 128 time steps x 9 features (batch first); the last hidden state feeds a linear
classifier over 2 classes.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class FastGRNNCell(nn.Module):
    # The low-rank factors are prunable (design.md §3.1); they are not conv/linear weights.
    gmp_prunable = ("W1", "W2", "U1", "U2")

    def __init__(self, input_size: int, hidden_size: int, w_rank: int, u_rank: int,
                 zeta_init: float = 1.0, nu_init: float = -4.0):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.W1 = nn.Parameter(0.1 * torch.randn(input_size, w_rank))
        self.W2 = nn.Parameter(0.1 * torch.randn(w_rank, hidden_size))
        self.U1 = nn.Parameter(0.1 * torch.randn(hidden_size, u_rank))
        self.U2 = nn.Parameter(0.1 * torch.randn(u_rank, hidden_size))
        self.bias_gate = nn.Parameter(torch.ones(1, hidden_size))
        self.bias_update = nn.Parameter(torch.ones(1, hidden_size))
        self.zeta = nn.Parameter(torch.full((1, 1), float(zeta_init)))
        self.nu = nn.Parameter(torch.full((1, 1), float(nu_init)))
        self.last_steps = 0  # time steps of the latest forward, for gmp_macs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [batch, steps, input_size] -> last hidden state [batch, hidden]."""
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"FastGRNN expects [batch, steps, {self.input_size}], got {tuple(x.shape)}")
        self.last_steps = x.shape[1]
        w_comp = x @ self.W1 @ self.W2  # the input term for every step at once
        h = x.new_zeros(x.shape[0], self.hidden_size)
        zeta, nu = torch.sigmoid(self.zeta), torch.sigmoid(self.nu)
        for t in range(x.shape[1]):
            pre = w_comp[:, t] + h @ self.U1 @ self.U2
            z = torch.sigmoid(pre + self.bias_gate)
            c = torch.tanh(pre + self.bias_update)
            h = z * h + (zeta * (1.0 - z) + nu) * c
        return h

    def gmp_macs(self) -> dict[str, int]:
        """Multiply-accumulates per sample of each factor in the latest forward (hooks cannot see matmuls)."""
        t = self.last_steps
        return {name: t * getattr(self, name).numel() for name in self.gmp_prunable}


class FastGRNN(nn.Module):
    def __init__(self, num_classes: int = 2, input_size: int = 9, hidden_size: int = 80,
                 w_rank: int = 9, u_rank: int = 80):
        super().__init__()
        self.cell = FastGRNNCell(input_size, hidden_size, w_rank, u_rank)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.cell(x))
