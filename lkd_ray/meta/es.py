"""Antithetic evolution strategies over (a slice of) φ, persistent by default (PES, Vicol, Metz &
Sohl-Dickstein, ICML 2021).

Particle p belongs to pair p // 2 with sign + (even p) or − (odd p). In round r every particle trains
its *own* student with φ_r + sign·σ·ε_{r,pair} for one truncation (``meta_every`` student steps),
then reports its quiz loss. ε comes from a seed derived from (run seed, round, pair), so anyone can
regenerate it: a particle's message is (particle, round, loss) — a few bytes — whatever dim φ is.

    plain ES:  ĝ = 1/(Nσ) Σ_i ε_i (L_i⁺ − L_i⁻)/2
    PES:       ĝ = 1/(Nσ²) Σ_i ξ_i (L_i⁺ − L_i⁻)/2,    ξ_i = σ Σ_{r' ≤ r} ε_{r',i}

PES keeps each particle's student running through the whole training (no resets), and ξ carries
every perturbation a trajectory has seen, which makes ĝ unbiased for the gradient of the sum of
quiz losses over the run — no truncation (short-horizon) bias, at the price of variance that grows
with dim φ: perturb only the last layer (``meta.es_params=last``) for small φ.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def _seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def es_index(lossnets: nn.Module, which: str = "last") -> torch.Tensor:
    """Positions, in the flat parameter vector of ``lossnets``, of the entries ES perturbs."""
    chosen = {id(p) for p in lossnets.es_parameters(which)}
    idx, offset = [], 0
    for p in lossnets.parameters():
        if id(p) in chosen:
            idx.append(torch.arange(offset, offset + p.numel()))
        offset += p.numel()
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)


class ESEstimator:
    """Noise, perturbations and the (persistent) antithetic gradient estimate for ``particles`` particles."""

    def __init__(self, dim: int, particles: int, sigma: float, persistent: bool = True, seed: int = 0):
        if particles < 2 or particles % 2:
            raise ValueError(f"ES needs an even number of particles (antithetic pairs), got {particles}")
        self.dim, self.particles, self.sigma, self.persistent, self.seed = dim, particles, float(sigma), persistent, seed
        self.pairs = particles // 2
        self.xi = torch.zeros(self.pairs, dim)  # accumulated perturbation per pair (PES)
        self.rounds = 0

    def noise(self, round_: int, pair: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, round_, pair))
        return torch.randn(self.dim, generator=g)

    def perturbation(self, round_: int, particle: int) -> torch.Tensor:
        sign = 1.0 if particle % 2 == 0 else -1.0
        return sign * self.sigma * self.noise(round_, particle // 2)

    def gradient(self, round_: int, losses: Mapping[int, float]) -> tuple[torch.Tensor, int]:
        """Estimate from one round's losses (particle → loss); returns (ĝ, pairs used). A pair with a
        missing or non-finite member is left out (and, for PES, still advances its ξ: it did perturb)."""
        g = torch.zeros(self.dim)
        used = 0
        for i in range(self.pairs):
            eps = self.sigma * self.noise(round_, i)
            self.xi[i] = self.xi[i] + eps if self.persistent else eps
            lp, lm = losses.get(2 * i), losses.get(2 * i + 1)
            if lp is None or lm is None or not (torch.isfinite(torch.tensor([lp, lm])).all()):
                continue
            g += self.xi[i] * (float(lp) - float(lm)) / 2
            used += 1
        self.rounds += 1
        return (g / (used * self.sigma**2) if used else g), used

    def state_dict(self) -> dict:
        return {"xi": self.xi.clone(), "rounds": self.rounds}

    def load_state_dict(self, sd: dict) -> None:
        self.xi = sd["xi"].clone()
        self.rounds = int(sd["rounds"])
