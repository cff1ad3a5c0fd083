-- How a worker serves each of its models on its devices, as it registered:
-- model name → {"parallel": "replicate" | "cfg" | "pipeline", "units":
-- ["cpu:0+cpu:1", …], "encoders": "same" | device, "max_batch": n}. Workers
-- registered before this column existed show none.
ALTER TABLE workers ADD COLUMN placements jsonb NOT NULL DEFAULT '{}'::jsonb;
