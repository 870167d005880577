"""Operations: metrics, the admin port and its limits, logs, and the allocator setting."""
