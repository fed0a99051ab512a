"""The order service's live overview page and the admin JSON behind it."""

from order.overview.api import overview_router

__all__ = ["overview_router"]
