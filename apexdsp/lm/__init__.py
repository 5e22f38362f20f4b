

# What an evaluation reports of where its time went (BatchStats.time_shares; report fields, CLI columns).
# Here, not in batching.py, so the CLI can name them without importing torch.
TIME_SHARES = ("lm_busy_share", "lm_prefill_share", "lm_rows_per_step", "lm_prefix_reused", "lm_capped_share",
               "lm_kv_padding", "lm_prefill_padding")
