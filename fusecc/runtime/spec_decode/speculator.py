"""Speculative decoding in the engine's step: propose, schedule, draft, verify, commit, roll back.

    spec = Speculator.build(engine_config, runner, block_manager, tokenizer)   # None without speculative_config
    spec.before_schedule(scheduler.running)        # seq.spec_token_ids: n-gram drafts, or k placeholders
    out = scheduler.schedule()                     # a decode with drafts computes 1 + k tokens (budget, blocks)
    spec.after_schedule(out, eos)                  # model drafts fill the placeholders (their own forwards)
    sampled = runner.execute(out, eos)             # one target forward; runner.verify_drafts -> SpecSamplerOutput
    stops = spec.commit(scheduler, output_processor, out, sampled)   # (under the engine's lock)

Commit replays the step as rounds of one token per sequence, so the scheduler's postprocess, the
output processor (detokenization, logprobs, stop strings) and the stop checker run unchanged:
round 0 commits every entry as scheduled minus its drafts (prefill chunks too) with its first
kept token; round r commits the r-th kept token of the entries that kept more and are still
running (the KV of the draft it follows is valid: that draft was accepted). A stop token, stop
string or max_tokens inside the accepted run finishes the sequence in its round and the later
tokens are dropped. Then the rejected tokens' KV is rolled back: blocks past the committed
positions are freed (they were appended for the drafts, so they are private and unhashed); slots
of rejected positions inside the kept last block are simply rewritten later. Prefix-cache hashes
only ever cover computed positions of token_ids, so a rejected token is never hashed.

When speculation runs (the rule, documented in the README):
- only for decoding sequences (chunked prefills and recomputes never speculate);
- not while more than `disable_by_batch_size` sequences decode (the forward is no longer memory-bound);
- k per sequence is cut so that max_tokens and max_model_len are never overshot;
- acceptance is watched as an exponential moving average over verification steps; a draft token
  pays off when the chance it is accepted exceeds what it costs, in target forwards: drafting it
  (0 for n-gram, L / layers for layer_skip, draft parameters / target parameters for a draft model)
  plus verifying it (VERIFY_TOKEN_COST: an estimate, ~free while a small-batch GPU forward is
  memory-bound, a sizeable fraction on a CPU). Below that rate proposals pause for PAUSE_STEPS
  steps, then resume (a probe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fusecc.runtime.sampler import SamplerOutput
from fusecc.runtime.scheduler import ScheduledSequence, SchedulerOutput
from fusecc.runtime.sequence import SequenceStatus
from fusecc.runtime.spec_decode.config import SpeculativeConfig
from fusecc.runtime.spec_decode.ngram_proposer import NgramProposer
from fusecc.runtime.spec_decode.rejection_sampler import DraftGroup, RejectionSampler, SpecSamplerOutput

# Cost of one more verified token, in target forwards (estimates: see the module docstring).
VERIFY_TOKEN_COST = {"cuda": 0.05, "cpu": 0.35}
PAUSE_STEPS = 64
EMA_WEIGHT = 0.1  # of the newest verification step
EMA_PRIOR = 1.0  # optimistic start: a method is judged on what it accepts, not on the prior


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0  # verification windows (a sequence verifying >= 1 draft token in a step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_paused_steps: int = 0  # steps without proposals because acceptance was low

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification window yields: the accepted drafts plus the target's own token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class Speculator:
    def __init__(self, config: SpeculativeConfig, runner, proposer) -> None:
        self.config, self.runner, self.proposer = config, runner, proposer
        self.k = config.num_speculative_tokens
        self.max_model_len = runner.config.max_model_len
        self.rejection = RejectionSampler(runner.sampler)
        self.stats = SpecDecodeStats()
        self._draft_probs: dict = {}
        self._ema = EMA_PRIOR
        # the acceptance rate below which speculation costs more than it saves
        self.min_acceptance_rate = min(0.9, getattr(proposer, "draft_cost", 0.0)
                                       + VERIFY_TOKEN_COST.get(runner.device.type, 0.05))
        self._paused = 0
        runner.verify_drafts = self.verify

    @classmethod
    def build(cls, engine_config, runner, block_manager, tokenizer) -> "Speculator | None":
        if engine_config.speculative_config is None:
            return None
        from fusecc.runtime.spec_decode.draft_loader import build_model_proposer

        cfg = SpeculativeConfig.parse(engine_config.speculative_config)
        if cfg.method == "ngram":
            proposer = NgramProposer(cfg.prompt_lookup_max, cfg.prompt_lookup_min)
        else:
            proposer = build_model_proposer(cfg, engine_config, runner, block_manager, tokenizer)
        if runner.cuda_graphs:
            from fusecc.runtime.spec_decode.verify_graphs import VerifyGraphs

            runner.verify_graphs = VerifyGraphs(runner, cfg.num_speculative_tokens, cfg.disable_by_batch_size)
        return cls(cfg, runner, proposer)

    # --- proposing ----------------------------------------------------------------------------
    def before_schedule(self, running: list) -> None:
        """Set every running sequence's spec_token_ids for this step ([] = no speculation)."""
        decoding = []
        for seq in running:
            seq.spec_token_ids = []
            if seq.num_uncomputed_tokens == 1 and seq.num_tokens > seq.num_prompt_tokens:
                decoding.append(seq)
        if not decoding or len(decoding) > self.config.disable_by_batch_size:
            return
        if self._paused:
            self._paused -= 1
            self.stats.num_paused_steps += 1
            return
        for seq in decoding:
            params = seq.sampling_params
            k = min(self.k, params.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens)
            if k <= 0:
                continue
            if isinstance(self.proposer, NgramProposer):
                seq.spec_token_ids = self.proposer.propose(seq.token_ids, k)
            else:
                seq.spec_token_ids = [0] * k  # placeholders: the draft model fills them after schedule()

    def after_schedule(self, out: SchedulerOutput, eos_token_ids=()) -> None:
        self._draft_probs = {}
        if not isinstance(self.proposer, NgramProposer):
            entries = [e for e in out.scheduled if e.spec_token_ids]
            self._draft_probs = self.proposer.propose(entries, eos_token_ids)

    # --- verifying (called by the model runner on the step's logits) --------------------------
    def verify(self, logits, entries: list[ScheduledSequence], eos_token_ids=()) -> SpecSamplerOutput:
        """logits: [R, V], the rows of the sampled entries (1 + drafts each), in order."""
        groups = [DraftGroup(e.seq, e.spec_token_ids, self._draft_probs.get(e.seq)) for e in entries if e.do_sample]
        return self.rejection(logits, groups, eos_token_ids)

    # --- committing ---------------------------------------------------------------------------
    def commit(self, scheduler, processor, out: SchedulerOutput, sampled: SpecSamplerOutput) -> None:
        """Scheduler.postprocess + OutputProcessor.process_tokens + finishes, one kept token per round."""
        flat = sampled.token_ids.tolist()  # the step's one synchronisation
        accepted = sampled.accepted.tolist()
        sampled_entries = [e for e in out.scheduled if e.do_sample]
        kept, first_row, start = [], [], 0
        for e in sampled_entries:
            k = len(e.spec_token_ids)
            a = 0
            while a < k and accepted[start + a]:
                a += 1
            kept.append(a + 1)
            first_row.append(start)
            if k:
                self.stats.num_drafts += 1
                self.stats.num_draft_tokens += k
                self.stats.num_accepted_tokens += a
            start += 1 + k
        self._note_acceptance(sampled_entries, kept)
        # round 0: the step as scheduled, drafts left out
        round0 = [dataclasses.replace(e, num_new_tokens=e.num_new_tokens - len(e.spec_token_ids), spec_token_ids=[])
                  if e.spec_token_ids else e for e in out.scheduled]
        self._commit_round(scheduler, processor, SchedulerOutput(scheduled=round0), first_row, flat, sampled,
                           prompt_logprobs=sampled.prompt_logprobs)
        for r in range(1, max(kept, default=1)):
            entries, rows = [], []
            for e, n, row in zip(sampled_entries, kept, first_row):
                if n > r and e.seq.status is SequenceStatus.RUNNING:
                    seq = e.seq
                    entries.append(ScheduledSequence(seq=seq, start=seq.num_computed_tokens, num_new_tokens=1,
                                                     is_prefill=False, do_sample=True, slot_mapping=[]))
                    rows.append(row + r)
            if entries:
                self._commit_round(scheduler, processor, SchedulerOutput(scheduled=entries), rows, flat, sampled)
        for e in sampled_entries:  # roll back the rejected tokens' blocks
            if e.spec_token_ids and e.seq.status is SequenceStatus.RUNNING:
                scheduler.block_manager.release_unused_tail(e.seq)

    @staticmethod
    def _commit_round(scheduler, processor, out: SchedulerOutput, rows: list[int], flat: list[int],
                      sampled: SpecSamplerOutput, prompt_logprobs=None) -> None:
        tokens = [flat[r] for r in rows]
        scheduler.postprocess(out, tokens)
        view = SamplerOutput(token_ids=sampled.token_ids, prompt_logprobs=prompt_logprobs)
        if sampled.logprobs is not None:  # the rows of this round, in its entries' order
            index = torch.tensor(rows, dtype=torch.int64, device=sampled.logprobs.device)
            view.logprobs, view.ranks = sampled.logprobs[index], sampled.ranks[index]
            if sampled.top_logprobs is not None:
                view.top_logprobs, view.top_token_ids = sampled.top_logprobs[index], sampled.top_token_ids[index]
        for seq, stop in processor.process_tokens(out, view, tokens):
            scheduler.finish(seq, stop.reason, stop.stop_reason)

    def _note_acceptance(self, entries: list[ScheduledSequence], kept: list[int]) -> None:
        drafted = sum(len(e.spec_token_ids) for e in entries)
        if not drafted:
            return
        rate = sum(n - 1 for n, e in zip(kept, entries) if e.spec_token_ids) / drafted
        self._ema = (1 - EMA_WEIGHT) * self._ema + EMA_WEIGHT * rate
        if self._ema < self.min_acceptance_rate:
            self._paused, self._ema = PAUSE_STEPS, EMA_PRIOR  # the probe after the pause starts afresh
