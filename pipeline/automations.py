"""`python -m pipeline.automations`: create or replace the automations of automations.yaml
on the Prefect server at PREFECT_API_URL, matched by name (run by `make deploy`)."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore

AUTOMATIONS = Path(__file__).with_name("automations.yaml")


def upsert(path: Path = AUTOMATIONS) -> list[str]:
    """Each automation of the file, replacing any of the same name. Returns their names."""
    wanted = [AutomationCore.model_validate(a) for a in yaml.safe_load(path.read_text())["automations"]]
    with get_client(sync_client=True) as client:
        for automation in wanted:
            for existing in client.read_automations_by_name(automation.name):
                client.delete_automation(existing.id)
            client.create_automation(automation)
    return [automation.name for automation in wanted]


if __name__ == "__main__":
    for name in upsert():
        print(f"automation: {name}")
