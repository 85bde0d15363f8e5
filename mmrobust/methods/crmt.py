"""JT, OJT and the CRMT family (paper §4, SPEC §3): step 1, step 2, N iterations, AT, Mix and the ablations."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmrobust import crmt as C
from mmrobust.methods import catalog
from mmrobust.methods.base import Method, Phase, register_method
from mmrobust.methods.common import adversarial_inputs, mixup


@register_method
class JT(Method):
    """Joint training: cross-entropy on the fused logits of a concatenation head."""
    name = "jt"
    head = "concat"

    def loss(self, model, inputs, y, ctx):
        out = model(inputs)
        loss = F.cross_entropy(out.logits, y)
        return loss, {"ce": loss.detach()}


@register_method
class OJT(JT):
    """JT with the CRMT head (orthonormal W̃_m, a_m) and no CRMT loss (paper Fig. 5 ablation)."""
    name = "ojt"
    head = "crmt"


def split_epochs(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@register_method
class CRMTJT(Method):
    """CRMT-JT: step 1 (CE + ρ·margin) then step 2 (only a_m, maximise the certified bound), `iterations` times."""
    name = "crmt_jt"
    head = "crmt"
    params_key = "crmt"
    Params = catalog.CRMTParams
    use_step1_margin = True
    use_step2 = True

    def phases(self):
        out = []
        for i, n in enumerate(split_epochs(self.cfg.epochs, self.p.iterations)):
            out.append(Phase(f"step1.{i}", n, schedule="step1"))
            if self.use_step2 and self.p.step2_epochs:
                # reference_compat reproduces defect 3: step 2 in train mode (BatchNorm statistics drift)
                out.append(Phase(f"step2.{i}", self.p.step2_epochs, train_mode=self.p.reference_compat,
                                 lr=self.p.step2_lr,
                                 momentum=self.p.step2_momentum, weight_decay=self.p.step2_weight_decay,
                                 scheduler=False, start=self.p.step2_from))
        return out

    def parameters(self, model, phase):
        if phase.name.startswith("step2"):
            return C.step2_parameters(model, freeze=False)
        return list(model.parameters())

    def after_step(self, model, ctx):
        if not self.p.reference_compat:  # projected SGD: a_m >= 0 after every step of every phase
            C.project_weights(model.head)

    def on_epoch_start(self, model, ctx):
        if ctx.phase.startswith("step2") and ctx.phase_epoch == 0:  # τ of the encoders step 1 just trained
            ctx.state["tau"] = C.estimate_tau(model, ctx.train_batches(), reference_compat=self.p.reference_compat,
                                              max_batches=self.p.tau_batches)

    def loss(self, model, inputs, y, ctx):
        if ctx.phase.startswith("step2"):
            out = model(inputs)
            head = model.head
            r = C.certified_bound(out, y, ctx.state["tau"], head.a, head.bias)
            return -r.mean(), {"bound": r.detach().mean()}
        return self.step1_loss(model, inputs, y, ctx)

    def step1_loss(self, model, inputs, y, ctx):
        out = model(inputs)
        ce = F.cross_entropy(out.logits, y)
        if not self.use_step1_margin:
            return ce, {"ce": ce.detach()}
        margin = C.crmt_margin_loss(out.scores, y, self.p.margin_eps)
        return ce + self.p.rho * margin, {"ce": ce.detach(), "margin": margin.detach()}


@register_method
class CRMTStep1(CRMTJT):
    """Ablation: step 1 only (orthogonal head + margin regulariser, no bound maximisation)."""
    name = "crmt_step1"
    use_step2 = False


@register_method
class CRMTStep2(CRMTJT):
    """Ablation: step 2 only (OJT training, then the certified-bound step on a_m)."""
    name = "crmt_step2"
    use_step1_margin = False


@register_method
class CRMTAT(CRMTJT):
    """CRMT-AT: step 1 on joint l2 PGD examples (ε 0.1, 5 steps of ε/5, model in eval mode while attacking)."""
    name = "crmt_at"

    def step1_loss(self, model, inputs, y, ctx):
        adv = adversarial_inputs(model, inputs, y, self.p.adv_eps, self.p.adv_steps)
        return super().step1_loss(model, adv, y, ctx)


def mix_margin(scores: dict, ya: torch.Tensor, yb: torch.Tensor, lam: float, eps: float = 1e-5,
               reference_compat: bool = False) -> torch.Tensor:
    """CRMT-Mix margin: per modality log Σ_{k∉{y_a,y_b}} exp(z_k) − (λ z_{y_a} + (1−λ) z_{y_b}), combined over
    modalities with log-sum-exp as in step 1 (so λ = 1, y_a = y_b reduces to the step-1 margin).

    reference_compat reproduces the released defect 4: the raw sum of exponentials (no log) minus the mixed
    target logits, averaged over modalities.
    """
    z = torch.stack([scores[m] for m in scores])  # (M, B, K)
    K = z.shape[-1]
    excluded = (F.one_hot(ya, K) + F.one_hot(yb, K)).bool().unsqueeze(0)
    target = lam * z.gather(2, ya.view(1, -1, 1).expand(len(z), -1, 1)) + (1 - lam) * z.gather(
        2, yb.view(1, -1, 1).expand(len(z), -1, 1))
    others = z.masked_fill(excluded, float("-inf"))
    if reference_compat:
        return (others.exp().sum(2, keepdim=True) - target).mean()
    per_mod = others.logsumexp(2, keepdim=True) - target  # (M, B, 1)
    lse = per_mod.squeeze(2).logsumexp(0)
    if eps > 0:
        lse = torch.logaddexp(lse, lse.new_tensor(eps).log())
    return lse.mean()


@register_method
class CRMTMix(CRMTJT):
    """CRMT-Mix: step 1 with multimodal mixup (shared λ and permutation) and the mixup margin."""
    name = "crmt_mix"

    def step1_loss(self, model, inputs, y, ctx):
        mixed, ya, yb, lam = mixup(inputs, y, self.p.mix_alpha)
        out = model(mixed)
        ce = lam * F.cross_entropy(out.logits, ya) + (1 - lam) * F.cross_entropy(out.logits, yb)
        margin = mix_margin(out.scores, ya, yb, lam, self.p.margin_eps, self.p.reference_compat)
        return ce + self.p.rho * margin, {"ce": ce.detach(), "margin": margin.detach()}
