-- 011: calls_node holds the live calls only. Every reader of it (judge_node_calls(), the
-- heartbeat's reconciliation) asks for a node's ringing or answered calls; the ended and
-- refused rows it also indexed cost a B-tree insertion at every release and refusal, and
-- stayed in the index until the janitor purged them.
DROP INDEX calls_node;
CREATE INDEX calls_node ON calls (node, boot) WHERE state IN ('ringing', 'answered');
