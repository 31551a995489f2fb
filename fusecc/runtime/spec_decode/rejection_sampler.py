"""Verification of draft tokens by the standard rejection-sampling rule (Leviathan et al. 2023,
Chen et al. 2023; vLLM v1's RejectionSampler), on the rows of one target forward.

    out = RejectionSampler(sampler)(logits, groups, eos_token_ids)
    # logits: [R, V], R = sum over sampled entries of 1 + len(drafts), the entry's rows contiguous
    out.token_ids[r]     # the token row r produces (see below); out.accepted[r]: its draft was kept

Per entry with drafts d_1..d_k, row j (0 <= j <= k) holds the target's logits after the known
tokens and d_1..d_j. Row j < k decides d_{j+1}; row k gives the bonus token. With p the target's
processed distribution at a row (SamplingParams applied exactly as the Sampler does, the outputs
seen by the row including d_1..d_j, so penalties, min_tokens and seeds follow the row) and q the
distribution the draft was drawn from (one-hot for deterministic proposers such as n-gram):
- greedy rows: the row's token is argmax(p); d_{j+1} is accepted iff it equals it;
- sampled rows: d_{j+1} is accepted with probability min(1, p(d)/q(d)); on rejection the row's token
  is drawn from normalize(max(p - q, 0)); the bonus row's token is drawn from p.
The entry keeps rows 0..a, a = the number of leading accepted drafts: the accepted drafts and the
token of the first rejecting row (or the bonus). The kept tokens are distributed exactly as tokens
sampled one at a time from p (greedy: identical to them).

Randomness: the acceptance uniforms and the recovery noise are drawn per row; a row with a seed
uses generators seeded from (seed, the row's output length), salted apart from each other and
from the draft's own sampling, so a seeded request is reproducible in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fusecc.runtime.sampler import Sampler, SamplerOutput, SamplingMetadata, _step_seed

# Salts of the independent random streams of a seeded row.
ACCEPT_SALT = 0x5EC1
DRAFT_SALT = 0x5EC2


class DraftRow:
    """A sequence as row j of a verification sees it: its outputs followed by drafts d_1..d_j
    (the duck type SamplingMetadata.build reads)."""

    __slots__ = ("seq", "drafts")

    def __init__(self, seq, drafts: list[int]) -> None:
        self.seq, self.drafts = seq, drafts

    @property
    def sampling_params(self):
        return self.seq.sampling_params

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.seq.prompt_token_ids

    @property
    def prompt_token_array(self):
        return self.seq.prompt_token_array

    @property
    def bad_words_token_ids(self):
        return self.seq.bad_words_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids + self.drafts


@dataclass
class DraftGroup:
    """One sampled entry of a verification step: its sequence, drafts (may be empty) and, for a
    sampling draft model, the distributions they were drawn from ([len(drafts), V], else None)."""

    seq: object
    drafts: list[int]
    draft_probs: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return 1 + len(self.drafts)

    def rows(self) -> list[DraftRow]:
        return [DraftRow(self.seq, self.drafts[:j]) for j in range(self.num_rows)]


@dataclass
class SpecSamplerOutput(SamplerOutput):
    accepted: torch.Tensor | None = None  # [R] bool: the row's draft was accepted (False on bonus rows)
    groups: list[DraftGroup] = field(default_factory=list)


def seeded_uniforms(n: int, seeds: list[int | None], salt: int, generator, device) -> torch.Tensor:
    """[n] uniforms in [0, 1); row r with a seed from its own generator seeded by (seed ^ salt)."""
    u = torch.rand(n, generator=generator, device=device)
    for r, seed in enumerate(seeds):
        if seed is not None:
            u[r] = torch.rand(1, generator=torch.Generator(device=device).manual_seed(seed ^ salt), device=device)[0]
    return u


class RejectionSampler:
    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler  # its generator, logprobs mode and processing steps

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, groups: list[DraftGroup], eos_token_ids=()) -> SpecSamplerOutput:
        rows = [row for g in groups for row in g.rows()]
        R, V = logits.shape
        assert R == len(rows), (R, len(rows))
        device = logits.device
        draft = torch.tensor([t for g in groups for t in g.drafts + [-1]], dtype=torch.int64).to(device)
        has_draft = draft >= 0
        md = SamplingMetadata.build(rows, vocab_size=V, device=device, eos_token_ids=eos_token_ids)
        if md.plain_greedy:
            token_ids = logits.argmax(dim=-1)
            return SpecSamplerOutput(token_ids=token_ids, accepted=has_draft & (token_ids == draft), groups=groups)
        penalized = self.sampler.penalize(logits, md)
        greedy_tokens = penalized.argmax(dim=-1)
        if md.all_greedy:
            token_ids, processed = greedy_tokens, penalized
            accepted = has_draft & (token_ids == draft)
        else:
            processed = self.sampler.truncate(penalized, md)
            p = processed.softmax(dim=-1)  # [R, V]
            q = self._draft_distributions(groups, draft, has_draft, R, V, device)
            safe = draft.clamp(min=0)[:, None]
            p_d, q_d = p.gather(1, safe).squeeze(1), q.gather(1, safe).squeeze(1)
            u = seeded_uniforms(R, md.step_seeds, ACCEPT_SALT, self.sampler._generator(device), device)
            accept_sampled = has_draft & (u * q_d < p_d)
            # rejected rows draw from max(p - q, 0) (q = 0 on bonus rows: p itself)
            recovered = self.sampler.sample((p - q).clamp_(min=0), md)
            token_ids = torch.where(md.greedy, greedy_tokens, torch.where(accept_sampled, draft, recovered))
            accepted = torch.where(md.greedy, has_draft & (greedy_tokens == draft), accept_sampled)
        out = SpecSamplerOutput(token_ids=token_ids, accepted=accepted, groups=groups)
        if md.max_num_logprobs is not None:
            self.sampler.add_logprobs(out, logits, penalized, processed, md)
        return out

    @staticmethod
    def _draft_distributions(groups: list[DraftGroup], draft: torch.Tensor, has_draft: torch.Tensor, R: int, V: int,
                             device) -> torch.Tensor:
        """[R, V] q per row: one-hot of the draft (deterministic proposers), the draft model's
        distribution when it sampled, 0 on bonus rows."""
        q = torch.zeros(R, V, dtype=torch.float32, device=device)
        rows = torch.arange(R, device=device)[has_draft]
        q[rows, draft[has_draft]] = 1.0
        start = 0
        for g in groups:
            if g.draft_probs is not None and g.drafts:
                q[start:start + len(g.drafts)] = g.draft_probs.to(device, torch.float32)
            start += g.num_rows
        return q
