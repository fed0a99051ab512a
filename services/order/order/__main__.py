"""``python -m order``: run one order instance (settings from the environment)."""

from ordermesh_shared.bootstrap import run_service

from order.app import OrderSettings, create_app


def main() -> None:
    """Entry point of the ``ordermesh-order`` script."""
    run_service(create_app, OrderSettings)


if __name__ == "__main__":
    main()
