"""The compiled form of Ccn2SGD's update (optim.py) for the step in which every learned matrix
is due: one kernel per matrix that reads W, inc and the gradient once and writes W and inc once,
with (μ, −ε/Nnom, −λ·ε) read from a device tensor, so a new rate costs no recompilation."""

import torch


def _update_in_place(params, incs, grads, coefficients):
    """inc = μ·inc + s·g + d·W, then W += inc, for each matrix; coefficients[k] = (μ, s, d)."""
    for param, inc, grad, row in zip(params, incs, grads, coefficients.unbind()):
        momentum, grad_scale, decay = row.unbind()
        inc.mul_(momentum).add_(grad * grad_scale).add_(param * decay)
        param.add_(inc)


class FusedUpdate:
    """The compiled form of Ccn2SGD._apply for the step in which every learned matrix is due.
    Its rates live in one device tensor, rewritten in place when the schedules move."""

    def __init__(self):
        self._update = torch.compile(_update_in_place, dynamic=False)
        self._coefficients = None        # (learned matrices, 3) on their device
        self._host = None                # pinned (μ, −ε/Nnom, −λ·ε) of the learned matrices
        self._stale = True

    def rates_changed(self):
        self._stale = True

    @staticmethod
    def _learned(groups):
        return [g for g in groups if g["base_lr"] > 0]

    def refresh(self, groups):
        learned = self._learned(groups)
        if not self._stale or not learned:
            return
        param = learned[0]["params"][0]
        values = torch.tensor([[g["momentum"], -g["lr"] / g["nominal_cases"],
                                -g["lr"] * g["wc"]] for g in learned], dtype=param.dtype)
        if self._coefficients is None:
            self._coefficients = values.to(param.device)
        else:
            # Pinned, so the copy queues behind the running work instead of waiting for it.
            self._host = values.pin_memory() if param.is_cuda else values
            self._coefficients.copy_(self._host, non_blocking=True)
        self._stale = False

    def apply(self, due, groups, state):
        """Update the matrices of `due` if the fused form covers the step; False if not."""
        learned = self._learned(groups)
        # weightSource receivers add their gradients at rates of their own: _apply does that.
        if len(due) != len(groups) or not learned or any(
                g["params"][0].grad is None or g["receivers"] for g in learned):
            return False
        params = [g["params"][0] for g in learned]
        if any((p.device, p.dtype) != (params[0].device, params[0].dtype) for p in params):
            return False
        self.refresh(groups)
        self._update(params, [state[p]["inc"] for p in params], [p.grad for p in params],
                     self._coefficients)
        return True
