"""The trainer's credit hooks with their terminal behaviour. Every trainer mixin (`VinePPOMixin`,
`TokenWeightingMixin`, `MacroActionMixin`) derives from `CreditHooks`, overrides what it provides and calls `super()`
for the rest, so the chain always ends here whatever the order of the mixins."""

from __future__ import annotations

from typing import Any

import torch


class CreditHooks:
    def _credit_requirement(self, requirement: str, out: dict[str, Any], ctx, batch_fields) -> dict[str, Any]:
        """Prepare what an estimator declared it needs (`requires=` at registration) as extra `CreditBatch` fields."""
        raise ValueError(
            f"advantage_estimator={self.args.advantage_estimator!r} requires {requirement!r}, which "
            f"{type(self).__name__} does not provide."
        )

    def _credit_local_postprocess(self, advantages: torch.Tensor, out: dict[str, Any], ctx) -> torch.Tensor:
        """This rank's advantages `(B,)` or `(B, T)` → what the loss receives (token weightings hook in here)."""
        return advantages
