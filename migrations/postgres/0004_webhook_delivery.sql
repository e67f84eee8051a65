-- An expanded event's delivery is handed to the sender at once unless its ordering key already
-- has pending deliveries that this process does not hold (then it queues behind them). This
-- finds those keys without walking every pending delivery.
CREATE INDEX webhook_deliveries_pending_by_key ON webhook_deliveries (ordering_key)
    WHERE status = 'pending';
