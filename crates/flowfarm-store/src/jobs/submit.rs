//! Submission: a batch and all its jobs in one transaction, idempotent per
//! submitter key, within the submitter's quotas.

use flowfarm_core::ResolvedJob;
use sqlx::Row;
use uuid::Uuid;

use super::*;
use crate::{PgStore, StoreError};

impl PgStore {
    /// [`Store::submit_batch`](crate::Store::submit_batch) on Postgres.
    pub async fn submit_batch(&self, batch: &NewBatch, jobs: &[ResolvedJob]) -> Result<SubmitOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(key) = &batch.idempotency_key {
            // Serialises submissions that share a key, so a concurrent replay
            // waits for the first one and then sees it.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || E'\\x1f' || $2, 0))")
                .bind(&batch.submitter)
                .bind(key)
                .execute(&mut *tx)
                .await?;
            let existing = sqlx::query("SELECT id, content_hash FROM batches WHERE submitter = $1 AND idempotency_key = $2")
                .bind(&batch.submitter)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = existing {
                let id: Uuid = row.try_get("id")?;
                let hash: Vec<u8> = row.try_get("content_hash")?;
                tx.rollback().await?;
                if hash != batch.content_hash {
                    return Err(StoreError::IdempotencyConflict { key: key.clone(), batch_id: id });
                }
                let batch = self.get_batch(id).await?;
                return Ok(SubmitOutcome { batch, created: false });
            }
        }

        crate::tenants::enforce_quotas(&mut tx, &batch.submitter, &batch.quotas, jobs.len()).await?;

        let batch_id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO batches (id, submitter, idempotency_key, content_hash, labels, total_jobs) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(batch_id)
        .bind(&batch.submitter)
        .bind(&batch.idempotency_key)
        .bind(&batch.content_hash)
        .bind(serde_json::to_value(&batch.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?)
        .bind(jobs.len() as i32)
        .execute(&mut *tx)
        .await?;

        let n = jobs.len();
        let mut ids = Vec::with_capacity(n);
        let mut idx = Vec::with_capacity(n);
        let (mut model, mut prompt, mut negative) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut width, mut height, mut steps) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut guidance, mut seed, mut shift) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut encoders, mut priority, mut attempts) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let mut labels = Vec::with_capacity(n);
        let mut tile_vae = Vec::with_capacity(n);
        for (i, job) in jobs.iter().enumerate() {
            ids.push(Uuid::now_v7());
            idx.push(i as i32);
            model.push(job.model.as_str());
            prompt.push(job.prompt.as_str());
            negative.push(job.negative_prompt.as_str());
            width.push(job.width as i32);
            height.push(job.height as i32);
            steps.push(job.steps as i32);
            guidance.push(job.guidance);
            seed.push(job.seed as i64);
            shift.push(job.shift);
            encoders.push(job.text_encoders.as_str());
            priority.push(job.priority);
            attempts.push(job.max_attempts as i32);
            labels.push(serde_json::to_string(&job.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?);
            tile_vae.push(job.tile_vae);
        }
        sqlx::query(
            "WITH ins AS (
                INSERT INTO jobs (id, batch_id, idx, model, prompt, negative_prompt, width, height, steps, guidance,
                                  seed, shift, text_encoders, priority, max_attempts, labels, tile_vae, state)
                SELECT u.id, $1, u.idx, u.model, u.prompt, u.neg, u.width, u.height, u.steps, u.guidance,
                       u.seed, u.shift, u.enc, u.priority, u.attempts, u.labels::jsonb, u.tile_vae, 'queued'
                FROM UNNEST($2::uuid[], $3::int4[], $4::text[], $5::text[], $6::text[], $7::int4[], $8::int4[],
                            $9::int4[], $10::float4[], $11::int8[], $12::float8[], $13::text[], $14::int4[],
                            $15::int4[], $16::text[], $18::bool[])
                     AS u(id, idx, model, prompt, neg, width, height, steps, guidance, seed, shift, enc, priority,
                          attempts, labels, tile_vae)
                RETURNING id, attempt
             )
             INSERT INTO job_events (job_id, batch_id, from_state, to_state, attempt, actor, reason)
             SELECT id, $1, NULL, 'queued', attempt, $17, 'submitted' FROM ins",
        )
        .bind(batch_id)
        .bind(&ids)
        .bind(&idx)
        .bind(&model)
        .bind(&prompt)
        .bind(&negative)
        .bind(&width)
        .bind(&height)
        .bind(&steps)
        .bind(&guidance)
        .bind(&seed)
        .bind(&shift)
        .bind(&encoders)
        .bind(&priority)
        .bind(&attempts)
        .bind(&labels)
        .bind(format!("submitter:{}", batch.submitter))
        .bind(&tile_vae)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;

        let batch = self.get_batch(batch_id).await?;
        Ok(SubmitOutcome { batch, created: true })
    }
}
