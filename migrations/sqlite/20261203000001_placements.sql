-- How a worker serves each of its models on its devices (as in
-- migrations/postgres/20261203000001_placements.sql), as JSON text.
ALTER TABLE workers ADD COLUMN placements TEXT NOT NULL DEFAULT '{}';
