"""``python -m shipping``: run one shipping instance (settings from the environment)."""

from ordermesh_shared.bootstrap import run_service

from shipping.app import ShippingSettings, create_app


def main() -> None:
    """Entry point of the ``ordermesh-shipping`` script."""
    run_service(create_app, ShippingSettings)


if __name__ == "__main__":
    main()
