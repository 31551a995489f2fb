"""A step's commit as the engine does it, for scheduler tests that run without an engine."""

from fusecc.runtime.stop_checker import check_stop


def commit(sched, out, tokens, eos=(0,)):
    """Scheduler.postprocess, then the stop checker's decisions (EOS, stop_token_ids, max_tokens,
    max_model_len; no stop strings: nothing is detokenized) applied with Scheduler.finish."""
    sched.postprocess(out, tokens)
    for e in out.sampled:
        if not e.seq.is_finished:  # not aborted between schedule and postprocess
            stop = check_stop(e.seq, frozenset(eos), sched.config.max_model_len)
            if stop is not None:
                sched.finish(e.seq, stop.reason, stop.stop_reason)
