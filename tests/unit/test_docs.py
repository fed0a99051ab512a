"""The README's configuration table lists exactly the settings the code reads."""

from __future__ import annotations

import re
from pathlib import Path

from inventory.app import InventorySettings
from order.app import OrderSettings
from payment.app import PaymentSettings
from shipping.app import ShippingSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_variables() -> set[str]:
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z_]+)` \|", section, flags=re.MULTILINE))


def test_every_setting_is_documented_and_nothing_else() -> None:
    classes = (OrderSettings, InventorySettings, PaymentSettings, ShippingSettings)
    fields = {name.upper() for cls in classes for name in cls.model_fields}
    assert documented_variables() == fields
