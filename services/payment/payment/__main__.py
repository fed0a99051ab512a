"""``python -m payment``: run one payment instance (settings from the environment)."""

from ordermesh_shared.bootstrap import run_service

from payment.app import PaymentSettings, create_app


def main() -> None:
    """Entry point of the ``ordermesh-payment`` script."""
    run_service(create_app, PaymentSettings)


if __name__ == "__main__":
    main()
