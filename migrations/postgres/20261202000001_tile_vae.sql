-- How the VAE decodes a job's image: true in tiles, false whole, NULL for the
-- worker to decide (whole unless its config says to tile or the whole image
-- would not fit). Jobs stored before this column existed were decoded by the
-- worker's rule too.
ALTER TABLE jobs ADD COLUMN tile_vae boolean;
