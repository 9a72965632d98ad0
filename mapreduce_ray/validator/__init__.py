"""What only a validator uses, without Ray: its settings (config), its SQLite ledger of miners, what a
round's reports prove (evidence), exact checks (verify), matching miners to jobs, scoring and the epoch
that sets weights on chain. A trainer imports none of it."""
