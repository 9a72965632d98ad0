"""Register a wallet's hotkey: python -m jobs.register +wallet=NAME [stake=...]

On the embedded chain it registers (a development wallet is created first if
missing) and prints the uid; on bittensor it prints the uid if registered, else
the btcli command that registers it. Settings: conf/register.yaml.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jobs.service import registered_uid, user_errors, wallet_and_chain


@hydra.main(config_path="../conf", config_name="register", version_base=None)
def main(cfg: DictConfig) -> None:
    with user_errors():
        wallet, chain = wallet_and_chain(cfg)
        uid = registered_uid(chain, wallet, cfg.stake)
        print(f"wallet {wallet.describe()} is uid {uid} on {chain.open().describe()}")


if __name__ == "__main__":
    main()
