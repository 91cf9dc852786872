//! The store's traffic table: each stack's (and layer's) load-balancer settings, kept as JSON so
//! that a new provider needs no schema change.

use std::collections::BTreeMap;

use sqlx::Row;

use super::{Store, StoreError};
use crate::traffic::TrafficSettings;

impl Store {
    /// Sets (or replaces) the traffic settings of `stack`, for `layer` ("" for the whole stack).
    pub async fn set_traffic(
        &self,
        stack: &str,
        layer: &str,
        settings: &TrafficSettings,
        actor: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(settings).map_err(|error| StoreError::Corrupt(error.to_string()))?;
        sqlx::query(
            "INSERT INTO traffic_settings (stack, layer, settings, updated_by, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (stack, layer) DO UPDATE SET settings = $3, updated_by = $4, updated_at = $5",
        )
        .bind(stack)
        .bind(layer)
        .bind(json)
        .bind(actor)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The traffic settings of `stack`, by layer ("" for the whole stack).
    pub async fn traffic(&self, stack: &str) -> Result<BTreeMap<String, TrafficSettings>, StoreError> {
        let rows = sqlx::query("SELECT layer, settings FROM traffic_settings WHERE stack = $1 ORDER BY layer")
            .bind(stack)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let layer: String = row.try_get("layer")?;
                let json: String = row.try_get("settings")?;
                let settings = serde_json::from_str(&json)
                    .map_err(|error| StoreError::Corrupt(format!("traffic settings of {stack}/{layer}: {error}")))?;
                Ok((layer, settings))
            })
            .collect()
    }

    /// Removes the traffic settings of `stack` for `layer`; whether there were any.
    pub async fn clear_traffic(&self, stack: &str, layer: &str) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM traffic_settings WHERE stack = $1 AND layer = $2")
            .bind(stack)
            .bind(layer)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }
}
