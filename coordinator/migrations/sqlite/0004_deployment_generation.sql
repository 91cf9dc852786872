-- Fencing of deployment writes: every update names the generation it read and bumps it, so a
-- writer holding an older view (a second coordinator, a stale one after a failover) is refused
-- instead of overwriting newer state.
ALTER TABLE deployments ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
