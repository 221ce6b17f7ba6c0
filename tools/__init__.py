"""Developer instruments (``python -m tools.NAME``), beside the product: nothing in it imports them."""
