-- How the VAE decodes a job's image: 1 in tiles, 0 whole, NULL for the
-- worker to decide (as in migrations/postgres/20261202000001_tile_vae.sql).
ALTER TABLE jobs ADD COLUMN tile_vae INTEGER;
