"""The matching loss: per-class mean embeddings of generated images against the released ones.

Classes get equal weight whatever their share of the batch (the release gives per-class means).
Two modes:

- "mmd": sum over classes and moments of ||m_gen - m_target||^2 (the squared MMD with kernel phi).
- "mavg": the paper's moving-average gap (GFMN, dos Santos et al. 2019). A K x D vector v per moment,
  trained by its own Adam to track gap = m_target - m_gen (detached), smooths the noisy per-batch
  gap; the generator loss -(v * m_gen).sum() has gradient -v ~ -(m_target - m_gen), which is the
  gradient of 1/2 ||m_target - m_gen||^2 with the batch noise averaged out.

Either way the reported value is the plain squared distance, so runs in both modes compare.
"""

from __future__ import annotations

import torch

from mepf_core.train_config import LOSS_MODES  # noqa: F401 (declared with the config)


def class_weight_matrix(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """K x B matrix W with W @ features = per-class means (row c averages the examples of class c).

    Every class must occur in the batch: a class with no example has no mean to match.
    """
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(dtype).T  # K x B
    counts = onehot.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts[:, 0] == 0).flatten().tolist()
        raise ValueError(f"every class needs at least one example in the batch; classes {missing} have none")
    return onehot / counts


def squared_distance(means: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over moments and classes of ||m_gen - m_target||^2, as a scalar tensor."""
    return sum(((means[name] - targets[name]) ** 2).sum() for name in targets)


class MatchingLoss:
    """Holds the float32 targets once and, in "mavg" mode, the moving-average gaps and their Adam."""

    def __init__(self, targets: dict[str, torch.Tensor], *, mode: str = "mavg", lr_mavg: float = 1e-3):
        if mode not in LOSS_MODES:
            raise ValueError(f"loss mode must be one of {LOSS_MODES}, got {mode!r}")
        if not lr_mavg > 0:
            raise ValueError(f"lr_mavg must be > 0, got {lr_mavg}")
        if "moment1" not in targets or set(targets) - {"moment1", "moment2"}:
            raise ValueError(f"targets must hold 'moment1' and optionally 'moment2', got {sorted(targets)}")
        self.mode = mode
        self.targets = {name: t.detach().float().contiguous() for name, t in targets.items()}
        self.gaps: dict[str, torch.Tensor] = {}
        self.optimizer: torch.optim.Adam | None = None
        if mode == "mavg":
            self.gaps = {name: torch.zeros_like(t, requires_grad=True) for name, t in self.targets.items()}
            self.optimizer = torch.optim.Adam(list(self.gaps.values()), lr=lr_mavg)

    def __call__(self, means: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to back-propagate into the generator, detached squared distance for reporting)."""
        distance = squared_distance({k: v.detach() for k, v in means.items()}, self.targets)
        if self.mode == "mmd":
            return squared_distance(means, self.targets), distance
        self._update_gaps(means)
        loss = -sum((self.gaps[name].detach() * means[name]).sum() for name in self.targets)
        return loss, distance

    def _update_gaps(self, means: dict[str, torch.Tensor]) -> None:
        """One Adam step of v towards the current gap (target - generated mean, no generator grad)."""
        gap_loss = sum(((self.gaps[n] - (self.targets[n] - means[n].detach())) ** 2).sum() for n in self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        gap_loss.backward()
        self.optimizer.step()

    def state_dict(self) -> dict:
        if self.mode == "mmd":
            return {"mode": self.mode}
        return {
            "mode": self.mode,
            "gaps": {name: g.detach().clone() for name, g in self.gaps.items()},
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"loss state is for mode {state.get('mode')!r}, this loss is {self.mode!r}")
        if self.mode == "mmd":
            return
        if set(state["gaps"]) != set(self.gaps):
            raise ValueError(f"loss state has moments {sorted(state['gaps'])}, expected {sorted(self.gaps)}")
        with torch.no_grad():
            for name, g in self.gaps.items():
                if tuple(state["gaps"][name].shape) != tuple(g.shape):
                    raise ValueError(
                        f"moving-average gap {name} has shape {tuple(state['gaps'][name].shape)}, expected {tuple(g.shape)}"
                    )
                g.copy_(state["gaps"][name])
        self.optimizer.load_state_dict(state["optimizer"])
