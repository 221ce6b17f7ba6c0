"""Small single-purpose helpers: config, boxes, image batching."""
