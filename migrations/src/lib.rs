//! herald's database schema as sea-orm migrations, portable between PostgreSQL and SQLite.
//!
//! [`Migrator`] lists the migrations in order: the membership reference tables, the
//! marketing reference tables, herald's own campaign bookkeeping, the coupon delivery columns,
//! then an index for segment bounds, running progress counters per campaign, the table that
//! claims each create's dedupe key, and the bucket count beside the progress counters. Run
//! `Migrator::up(&db, None)` to create every table and `Migrator::down(&db, None)` to drop
//! them again. Table and column names are a contract with the rest of the workspace.

use sea_orm_migration::prelude::*;

mod m20261121_000001_membership;
mod m20261121_000002_marketing;
mod m20261121_000003_campaign;
mod m20261121_000004_coupon_delivery;
mod m20261121_000005_segment_index;
mod m20261121_000006_campaign_progress;
mod m20261121_000007_campaign_dedupe;
mod m20261121_000008_progress_buckets_total;

/// Applies and rolls back herald's schema migrations, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_membership::Migration),
            Box::new(m20261121_000002_marketing::Migration),
            Box::new(m20261121_000003_campaign::Migration),
            Box::new(m20261121_000004_coupon_delivery::Migration),
            Box::new(m20261121_000005_segment_index::Migration),
            Box::new(m20261121_000006_campaign_progress::Migration),
            Box::new(m20261121_000007_campaign_dedupe::Migration),
            Box::new(m20261121_000008_progress_buckets_total::Migration),
        ]
    }
}

/// `url` (a database URL) with its database name replaced by `database`; its parameters,
/// such as `?sslmode=disable`, are kept.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// A `BIGINT` auto-increment primary key (`bigserial` on PostgreSQL).
///
/// sea-query's own `schema::pk_auto` is a 32-bit `integer`; ids here are 64-bit. On SQLite
/// sea-query renders this as `integer PRIMARY KEY AUTOINCREMENT`, the only form SQLite
/// accepts for auto-increment, and SQLite integers are 64-bit anyway.
fn pk_big_auto<T: IntoIden>(col: T) -> ColumnDef {
    ColumnDef::new(col)
        .big_integer()
        .auto_increment()
        .primary_key()
        .take()
}

/// Creates a plain (non-unique) index `name` on `table` over `cols`.
fn index<T, C, I>(name: &str, table: T, cols: I) -> IndexCreateStatement
where
    T: IntoIden + 'static,
    C: IntoIden,
    I: IntoIterator<Item = C>,
{
    let mut stmt = Index::create();
    stmt.name(name).table(table);
    for col in cols {
        stmt.col(col);
    }
    stmt
}

/// Creates a unique index `name` on `table` over `cols`.
fn unique_index<T, C, I>(name: &str, table: T, cols: I) -> IndexCreateStatement
where
    T: IntoIden + 'static,
    C: IntoIden,
    I: IntoIterator<Item = C>,
{
    let mut stmt = index(name, table, cols);
    stmt.unique();
    stmt
}

/// Drops `table`; its indexes go with it on both backends.
fn drop_table<T: IntoIden + 'static>(table: T) -> TableDropStatement {
    Table::drop().table(table).to_owned()
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn with_database_replaces_only_the_path() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "x"),
            "postgres://h:5432/x"
        );
    }
}
