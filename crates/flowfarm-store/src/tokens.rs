//! API tokens: bearer secrets stored as SHA-256 hashes.

use flowfarm_core::Role;
use sha2::{Digest, Sha256};
use sqlx::Row;
use uuid::Uuid;

use crate::{PgStore, StoreError};

/// Prefix of every secret, so leaked tokens are easy to grep for.
pub const TOKEN_PREFIX: &str = "fft_";

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

impl PgStore {
    /// Creates a token and returns it with its secret, which is not stored
    /// and cannot be shown again. `entropy` must be 32 random bytes.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the insert fails.
    pub async fn create_token(&self, name: &str, role: Role, entropy: [u8; 32]) -> Result<(TokenInfo, String), StoreError> {
        let secret = format!("{TOKEN_PREFIX}{}", hex::encode(entropy));
        let id = Uuid::now_v7();
        sqlx::query("INSERT INTO api_tokens (id, name, role, token_hash) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(name)
            .bind(role.as_str())
            .bind(hash(&secret))
            .execute(&self.pool)
            .await?;
        Ok((TokenInfo { id, name: name.to_owned(), role }, secret))
    }

    /// The live (not revoked) token with this secret, if any.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<TokenInfo>, StoreError> {
        let row = sqlx::query("SELECT id, name, role FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL")
            .bind(hash(secret))
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            let role: String = row.try_get("role")?;
            Ok(TokenInfo {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("token role {role}")))?,
            })
        })
        .transpose()
    }

    /// Every live token (without secrets).
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let rows = sqlx::query("SELECT id, name, role FROM api_tokens WHERE revoked_at IS NULL ORDER BY id").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let role: String = row.try_get("role")?;
                Ok(TokenInfo {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("token role {role}")))?,
                })
            })
            .collect()
    }

    /// Revokes a token; its secret stops working at once.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if no live token has that id.
    pub async fn revoke_token(&self, id: Uuid) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { what: "token", id });
        }
        Ok(())
    }
}
