-- How each approval came about: 'forward' (a deployment) or 'rollback' (`rollwave rollback`
-- returned the stack to it), so that rolling back twice steps back twice through the history
-- instead of rolling forward again (see rollwave_release::history).
ALTER TABLE approvals ADD COLUMN kind TEXT NOT NULL DEFAULT 'forward';
