-- The stack and instance each audit event concerns, so `rollwave event list
-- --stack/--instance` filters in the query. Derived from the target when the
-- event is recorded (see `Store::record_event`); '' when it concerns none.

ALTER TABLE events ADD COLUMN stack TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN instance TEXT NOT NULL DEFAULT '';

-- Events recorded before this migration, by the same rules.
UPDATE events SET instance = target WHERE target IN (SELECT id FROM instances);
UPDATE events SET stack = COALESCE(
    (SELECT stack FROM instances WHERE id = events.target),
    (SELECT stack FROM deployments WHERE id = events.target),
    (SELECT stack FROM join_tokens WHERE id = events.target),
    (SELECT name FROM stacks WHERE name = events.target),
    (SELECT name FROM stacks WHERE instr(events.target, '/') > 0
        AND name = substr(events.target, 1, instr(events.target, '/') - 1)),
    '');

CREATE INDEX events_by_stack ON events (stack, sequence);
CREATE INDEX events_by_instance ON events (instance, sequence);
CREATE INDEX events_by_actor ON events (actor, sequence);
