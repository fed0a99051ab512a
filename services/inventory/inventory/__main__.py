"""``python -m inventory``: run one inventory instance (settings from the environment)."""

from ordermesh_shared.bootstrap import run_service

from inventory.app import InventorySettings, create_app


def main() -> None:
    """Entry point of the ``ordermesh-inventory`` script."""
    run_service(create_app, InventorySettings)


if __name__ == "__main__":
    main()
