//! PostgreSQL catalog → [`Schema`].
//!
//! Reads `pg_catalog` directly and lets the server render definitions (`format_type`,
//! `pg_get_constraintdef`, `pg_get_indexdef`, `pg_get_viewdef`, `pg_get_functiondef`,
//! `pg_get_triggerdef`, `pg_get_expr`), so a PostgreSQL target gets exactly what the source has.
//! Objects that belong to extensions are left to `CREATE EXTENSION`.

use std::collections::{BTreeSet, HashMap};

use tokio_postgres::Client;

use super::{Context, Error, Result};
use crate::config::Selection;
use crate::model::schema::*;

/// `n.nspname` and `c.relname` always quoted, exactly like `QualifiedName`'s `Display`
/// (`format('%I.%I')` quotes only where needed, so it cannot be compared with our names).
pub const QUOTED_RELATION: &str = "('\"' || replace(n.nspname, '\"', '\"\"') || '\".\"' || replace(c.relname, '\"', '\"\"') || '\"')";

/// Schemas that are never user data.
pub const SYSTEM_SCHEMA_FILTER: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'kuaka') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

const NOT_EXTENSION_MEMBER: &str = "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{class}'::regclass \
     AND d.objid = {oid} AND d.deptype = 'e')";

fn not_extension_member(class: &str, oid: &str) -> String {
    NOT_EXTENSION_MEMBER
        .replace("{class}", class)
        .replace("{oid}", oid)
}

/// Read the schema of the selected tables and everything they need.
pub async fn read_schema(client: &Client, selection: &Selection) -> Result<Schema> {
    let mut schema = Schema::default();
    let tables = read_tables(client, selection).await?;
    let oids: Vec<u32> = tables.iter().map(|(oid, _)| *oid).collect();
    let mut tables_by_oid: HashMap<u32, Table> = tables.into_iter().collect();
    read_columns(client, &oids, &mut tables_by_oid).await?;
    read_constraints(client, &oids, &mut tables_by_oid).await?;
    read_indexes(client, &oids, &mut tables_by_oid).await?;
    read_triggers(client, &oids, &mut tables_by_oid).await?;
    let mut tables: Vec<Table> = oids
        .iter()
        .filter_map(|o| tables_by_oid.remove(o))
        .collect();
    // Partitions after their parents; otherwise alphabetical.
    order_partitions(&mut tables);

    let namespaces: BTreeSet<String> = tables.iter().map(|t| t.name.schema.clone()).collect();
    // Without a filter every user schema moves (with its types, functions and views); with a
    // filter only the schemas of the selected tables.
    let schema_filter = if selection.is_filtered() {
        namespaces.iter().cloned().collect::<Vec<_>>()
    } else {
        all_user_schemas(client).await?
    };
    schema.namespaces = schema_filter.clone();
    schema.namespace_comments = read_namespace_comments(client, &schema_filter).await?;
    schema.extensions = read_extensions(client).await?;
    schema.types = read_types(client, &schema_filter).await?;
    schema.routines = read_routines(client, &schema_filter).await?;
    schema.sequences = read_sequences(client, &schema_filter, &tables, selection).await?;
    schema.views = read_views(client, &schema_filter).await?;
    schema.skipped = read_unsupported(client, &schema_filter, &tables).await?;
    schema.tables = tables;
    Ok(schema)
}

/// Stable order: every partition right after all tables, parents before children.
fn order_partitions(tables: &mut Vec<Table>) {
    let mut ordered: Vec<Table> = Vec::with_capacity(tables.len());
    let mut pending: Vec<Table> = std::mem::take(tables);
    pending.sort_by(|a, b| a.name.cmp(&b.name));
    loop {
        let before = pending.len();
        let mut rest = Vec::new();
        for t in pending {
            let ready = match &t.partitioning.partition_of {
                Some((parent, _)) => ordered.iter().any(|o| &o.name == parent),
                None => true,
            };
            if ready { ordered.push(t) } else { rest.push(t) }
        }
        pending = rest;
        if pending.is_empty() || pending.len() == before {
            ordered.extend(pending);
            break;
        }
    }
    *tables = ordered;
}

async fn all_user_schemas(client: &Client) -> Result<Vec<String>> {
    let sql = format!(
        "SELECT n.nspname::text FROM pg_namespace n WHERE {SYSTEM_SCHEMA_FILTER} AND {} ORDER BY 1",
        not_extension_member("pg_namespace", "n.oid")
    );
    let rows = client
        .query(&sql, &[])
        .await
        .ctx(|| "listing schemas".into())?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn read_namespace_comments(
    client: &Client,
    schemas: &[String],
) -> Result<Vec<(String, String)>> {
    let rows = client
        .query(
            "SELECT n.nspname::text, obj_description(n.oid, 'pg_namespace') FROM pg_namespace n \
             WHERE n.nspname = ANY($1) AND obj_description(n.oid, 'pg_namespace') IS NOT NULL \
             AND n.nspname <> 'public'",
            &[&schemas],
        )
        .await
        .ctx(|| "reading schema comments".into())?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn read_tables(client: &Client, selection: &Selection) -> Result<Vec<(u32, Table)>> {
    let sql = format!(
        "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, c.relpersistence::text, \
                CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END, \
                CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END, \
                (SELECT pn.nspname::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
                   JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE i.inhrelid = c.oid LIMIT 1), \
                (SELECT p.relname::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
                   WHERE i.inhrelid = c.oid LIMIT 1), \
                c.relispartition, c.reltuples::float8, \
                CASE WHEN c.relkind = 'r' THEN pg_relation_size(c.oid) ELSE 0 END, \
                obj_description(c.oid, 'pg_class') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' AND {SYSTEM_SCHEMA_FILTER} AND {} \
         ORDER BY n.nspname, c.relname",
        not_extension_member("pg_class", "c.oid")
    );
    let rows = client
        .query(&sql, &[])
        .await
        .ctx(|| "listing tables".into())?;
    let mut all = Vec::new();
    let mut parent_of: HashMap<QualifiedName, QualifiedName> = HashMap::new();
    for r in &rows {
        let oid: u32 = r.get(0);
        let name = QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2));
        let kind = if r.get::<_, String>(3) == "p" {
            TableKind::Partitioned
        } else {
            TableKind::Plain
        };
        let parent = match (r.get::<_, Option<String>>(7), r.get::<_, Option<String>>(8)) {
            (Some(s), Some(n)) => Some(QualifiedName::new(s, n)),
            _ => None,
        };
        let is_partition: bool = r.get(9);
        if let (Some(parent), false) = (&parent, is_partition) {
            return Err(Error::Definite(format!(
                "table {} inherits from {} (table inheritance is not supported); exclude both with --exclude or convert them to declarative partitioning",
                name.display_name(),
                parent.display_name()
            )));
        }
        let partition_of = match (parent.clone(), r.get::<_, Option<String>>(6)) {
            (Some(p), Some(bound)) if is_partition => {
                parent_of.insert(name.clone(), p.clone());
                Some((p, bound))
            }
            _ => None,
        };
        let reltuples: f64 = r.get(10);
        let table = Table {
            name,
            kind,
            unlogged: r.get::<_, String>(4) == "u",
            columns: Vec::new(),
            primary_key: None,
            unique_keys: Vec::new(),
            checks: Vec::new(),
            exclusions: Vec::new(),
            foreign_keys: Vec::new(),
            indexes: Vec::new(),
            triggers: Vec::new(),
            partitioning: Partitioning {
                partition_by: r.get(5),
                partition_of,
            },
            comment: r.get(12),
            estimated_rows: if reltuples < 0.0 {
                None
            } else {
                Some(reltuples as i64)
            },
            estimated_bytes: r.get(11),
        };
        all.push((oid, table));
    }
    // A partition belongs to the job when its root table is selected.
    let root_of = |name: &QualifiedName| {
        let mut n = name.clone();
        while let Some(p) = parent_of.get(&n) {
            n = p.clone();
        }
        n
    };
    Ok(all
        .into_iter()
        .filter(|(_, t)| selection.selects(&root_of(&t.name)))
        .collect())
}

/// Map a type (by its `pg_type` facts) into the engine-independent model.
pub(crate) fn data_type(
    typname: &str,
    typtype: &str,
    namespace: &str,
    formatted: &str,
    element: Option<DataType>,
) -> DataType {
    let length = || {
        formatted.split_once('(').and_then(|(_, rest)| {
            rest.trim_end_matches(')')
                .split(',')
                .next()?
                .trim()
                .parse()
                .ok()
        })
    };
    if let Some(element) = element {
        return DataType::Array {
            element: Box::new(element),
        };
    }
    let user = || QualifiedName::new(namespace, typname);
    match typtype {
        "e" => return DataType::Enum { name: user() },
        "d" => return DataType::Domain { name: user() },
        "c" => return DataType::Composite { name: user() },
        "r" | "m" => {
            return DataType::Range {
                name: formatted.to_owned(),
            };
        }
        _ => {}
    }
    match typname {
        "bool" => DataType::Bool,
        "int2" => DataType::Int16,
        "int4" => DataType::Int32,
        "int8" => DataType::Int64,
        "float4" => DataType::Float32,
        "float8" => DataType::Float64,
        "numeric" => {
            let parts: Vec<Option<u32>> = formatted
                .split_once('(')
                .map(|(_, r)| {
                    r.trim_end_matches(')')
                        .split(',')
                        .map(|p| p.trim().parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            let mut parts = parts.into_iter();
            DataType::Numeric {
                precision: parts.next().flatten(),
                scale: parts.next().flatten(),
            }
        }
        "money" => DataType::Money,
        "bpchar" => DataType::Char { length: length() },
        "varchar" => DataType::Varchar { length: length() },
        "text" => DataType::Text,
        "bytea" => DataType::Bytes,
        "date" => DataType::Date,
        "time" => DataType::Time,
        "timetz" => DataType::TimeTz,
        "timestamp" => DataType::Timestamp,
        "timestamptz" => DataType::TimestampTz,
        "interval" => DataType::Interval,
        "uuid" => DataType::Uuid,
        "json" => DataType::Json,
        "jsonb" => DataType::Jsonb,
        "bit" => DataType::Bit {
            length: length(),
            varying: false,
        },
        "varbit" => DataType::Bit {
            length: length(),
            varying: true,
        },
        _ => DataType::Other {
            name: formatted.to_owned(),
        },
    }
}

async fn read_columns(
    client: &Client,
    oids: &[u32],
    tables: &mut HashMap<u32, Table>,
) -> Result<()> {
    // Identity sequences' options, keyed by (table oid, column number).
    let identity_rows = client
        .query(
            "SELECT d.refobjid, d.refobjsubid::int, format_type(s.seqtypid, NULL), s.seqstart, \
                    s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle \
             FROM pg_depend d JOIN pg_sequence s ON s.seqrelid = d.objid \
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
               AND d.deptype = 'i' AND d.refobjid = ANY($1)",
            &[&oids],
        )
        .await
        .ctx(|| "reading identity sequences".into())?;
    let mut identity: HashMap<(u32, i32), SequenceOptions> = HashMap::new();
    for r in &identity_rows {
        identity.insert(
            (r.get(0), r.get(1)),
            SequenceOptions {
                data_type: r.get(2),
                start: r.get(3),
                increment: r.get(4),
                min_value: r.get(5),
                max_value: r.get(6),
                cache: r.get(7),
                cycle: r.get(8),
            },
        );
    }
    let rows = client
        .query(
            "SELECT a.attrelid, a.attnum::int, a.attname::text, format_type(a.atttypid, a.atttypmod), \
                    a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid), a.attgenerated::text, \
                    a.attidentity::text, \
                    CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0 THEN \
                      (SELECT quote_ident(cn.nspname) || '.' || quote_ident(co.collname) FROM pg_collation co \
                       JOIN pg_namespace cn ON cn.oid = co.collnamespace WHERE co.oid = a.attcollation) END, \
                    col_description(a.attrelid, a.attnum), \
                    t.typname::text, t.typtype::text, tn.nspname::text, \
                    et.typname::text, et.typtype::text, etn.nspname::text, \
                    format_type(et.oid, NULL), \
                    a.atttypid, COALESCE(et.oid, 0::oid), a.attislocal \
             FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace tn ON tn.oid = t.typnamespace \
             LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A' \
             LEFT JOIN pg_namespace etn ON etn.oid = et.typnamespace \
             LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum \
             WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attrelid, a.attnum",
            &[&oids],
        )
        .await
        .ctx(|| "reading columns".into())?;
    for r in &rows {
        let oid: u32 = r.get(0);
        let Some(table) = tables.get_mut(&oid) else {
            continue;
        };
        let attnum: i32 = r.get(1);
        let formatted: String = r.get(3);
        let default: Option<String> = r.get(5);
        let generated: String = r.get(6);
        let identity_kind: String = r.get(7);
        let typname: String = r.get(10);
        let typtype: String = r.get(11);
        let typnamespace: String = r.get(12);
        let element = match (
            r.get::<_, Option<String>>(13),
            r.get::<_, Option<String>>(14),
        ) {
            (Some(en), Some(et)) => {
                let ens: String = r.get(15);
                let ef: String = r.get(16);
                Some(data_type(&en, &et, &ens, &ef, None))
            }
            _ => None,
        };
        let element_schema: Option<String> = r.get(15);
        let type_oid: u32 = r.get(17);
        let element_oid: u32 = r.get(18);
        // OIDs below FirstNormalObjectId (16384) are built-in and identical on every server.
        let builtin = |oid: u32| oid < 16384;
        let binary_portable = match element_oid {
            0 => builtin(type_oid) || matches!(typtype.as_str(), "e" | "d" | "r" | "m"),
            e => builtin(e),
        };
        let dt = data_type(&typname, &typtype, &typnamespace, &formatted, element);
        let (default, generated) = if generated == "s" {
            (None, default)
        } else {
            (default, None)
        };
        let identity = match identity_kind.as_str() {
            "a" | "d" => Some(Identity {
                always: identity_kind == "a",
                sequence: identity.get(&(oid, attnum)).cloned(),
            }),
            _ => None,
        };
        table.columns.push(Column {
            name: r.get(2),
            data_type: dt,
            native_type: formatted,
            binary_portable,
            nullable: !r.get::<_, bool>(4),
            default,
            generated,
            identity,
            collation: r.get(8),
            comment: r.get(9),
            type_schema: Some(element_schema.unwrap_or(typnamespace)).filter(|s| s != "pg_catalog"),
        });
    }
    // Domains over composites or over arrays of user types are rare; the per-type check below
    // covers domains over user base types, which may lack binary I/O.
    let rows = client
        .query(
            "SELECT a.attrelid, a.attname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_type b ON b.oid = t.typbasetype \
             WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND t.typtype = 'd' \
               AND (b.typtype = 'c' OR (b.typcategory = 'A' AND b.typelem >= 16384) \
                    OR (b.oid >= 16384 AND b.typtype = 'b'))",
            &[&oids],
        )
        .await
        .ctx(|| "checking domain base types".into())?;
    for r in &rows {
        let oid: u32 = r.get(0);
        let name: String = r.get(1);
        if let Some(c) = tables
            .get_mut(&oid)
            .and_then(|t| t.columns.iter_mut().find(|c| c.name == name))
        {
            c.binary_portable = false;
        }
    }
    Ok(())
}

async fn read_constraints(
    client: &Client,
    oids: &[u32],
    tables: &mut HashMap<u32, Table>,
) -> Result<()> {
    let rows = client
        .query(
            "SELECT con.conrelid, con.conname::text, con.contype::text, pg_get_constraintdef(con.oid), \
                    ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, i) \
                          JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.i), \
                    rn.nspname::text, rc.relname::text, \
                    ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, i) \
                          JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.i), \
                    con.convalidated, con.conislocal, con.conparentid <> 0 \
             FROM pg_constraint con \
             LEFT JOIN pg_class rc ON rc.oid = con.confrelid \
             LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace \
             WHERE con.conrelid = ANY($1) AND con.contype IN ('p', 'u', 'c', 'f', 'x') \
               AND (con.conparentid = 0 OR con.contype = 'p') \
             ORDER BY con.conrelid, con.conname",
            &[&oids],
        )
        .await
        .ctx(|| "reading constraints".into())?;
    for r in &rows {
        let oid: u32 = r.get(0);
        let Some(table) = tables.get_mut(&oid) else {
            continue;
        };
        let name: String = r.get(1);
        let kind: String = r.get(2);
        let definition: String = r.get(3);
        let columns: Vec<String> = r.get(4);
        let local: bool = r.get(9);
        let inherited: bool = r.get(10);
        match kind.as_str() {
            "p" => {
                table.primary_key = Some(Key {
                    name,
                    columns,
                    definition,
                    inherited,
                })
            }
            "u" => table.unique_keys.push(Key {
                name,
                columns,
                definition,
                inherited,
            }),
            // Inherited check constraints come with the parent (partitions).
            "c" if local => table.checks.push(Constraint { name, definition }),
            "c" => {}
            "x" => table.exclusions.push(Constraint { name, definition }),
            "f" => table.foreign_keys.push(ForeignKey {
                name,
                columns,
                referenced_table: QualifiedName::new(
                    r.get::<_, Option<String>>(5).unwrap_or_default(),
                    r.get::<_, Option<String>>(6).unwrap_or_default(),
                ),
                referenced_columns: r.get(7),
                not_valid: !r.get::<_, bool>(8),
                definition,
            }),
            _ => {}
        }
    }
    Ok(())
}

async fn read_indexes(
    client: &Client,
    oids: &[u32],
    tables: &mut HashMap<u32, Table>,
) -> Result<()> {
    let rows = client
        .query(
            "SELECT i.indrelid, ic.relname::text, pg_get_indexdef(i.indexrelid), i.indisunique, \
                    ARRAY(SELECT CASE WHEN k.n = 0 OR i.indpred IS NOT NULL THEN '<expression>' ELSE a.attname::text END \
                          FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o) \
                          LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n \
                          WHERE k.o <= i.indnkeyatts ORDER BY k.o) \
             FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
             WHERE i.indrelid = ANY($1) \
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid \
                               AND c.contype IN ('p', 'u', 'x')) \
               AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid) \
             ORDER BY i.indrelid, ic.relname",
            &[&oids],
        )
        .await
        .ctx(|| "reading indexes".into())?;
    for r in &rows {
        let oid: u32 = r.get(0);
        let Some(table) = tables.get_mut(&oid) else {
            continue;
        };
        // An index on a partitioned table is printed `ON ONLY`; creating it without ONLY
        // cascades to every partition, which is what we want.
        let definition: String = r.get::<_, String>(2).replacen(" ON ONLY ", " ON ", 1);
        table.indexes.push(Index {
            name: r.get(1),
            unique: r.get(3),
            definition,
            // Key columns, for another engine; `<expression>` for expressions and for every
            // column of a partial index (neither can be rendered elsewhere).
            columns: r.get(4),
        });
    }
    Ok(())
}

async fn read_triggers(
    client: &Client,
    oids: &[u32],
    tables: &mut HashMap<u32, Table>,
) -> Result<()> {
    let rows = client
        .query(
            "SELECT t.tgrelid, t.tgname::text, pg_get_triggerdef(t.oid), t.tgenabled::text \
             FROM pg_trigger t WHERE t.tgrelid = ANY($1) AND NOT t.tgisinternal AND t.tgparentid = 0 \
             ORDER BY t.tgrelid, t.tgname",
            &[&oids],
        )
        .await
        .ctx(|| "reading triggers".into())?;
    for r in &rows {
        let oid: u32 = r.get(0);
        if let Some(table) = tables.get_mut(&oid) {
            table.triggers.push(Trigger {
                name: r.get(1),
                definition: r.get(2),
                enabled: r.get(3),
            });
        }
    }
    Ok(())
}

async fn read_extensions(client: &Client) -> Result<Vec<Extension>> {
    let rows = client
        .query(
            "SELECT e.extname::text, n.nspname::text FROM pg_extension e \
             JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname <> 'plpgsql' ORDER BY e.oid",
            &[],
        )
        .await
        .ctx(|| "reading extensions".into())?;
    Ok(rows
        .iter()
        .map(|r| Extension {
            name: r.get(0),
            schema: r.get(1),
        })
        .collect())
}

async fn read_types(client: &Client, schemas: &[String]) -> Result<Vec<UserType>> {
    let sql = format!(
        "SELECT t.oid, n.nspname::text, t.typname::text, t.typtype::text, \
                CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) END, \
                t.typnotnull, t.typdefault, \
                CASE WHEN t.typtype = 'd' AND t.typcollation <> 0 AND t.typcollation <> \
                     (SELECT b.typcollation FROM pg_type b WHERE b.oid = t.typbasetype) THEN \
                     (SELECT quote_ident(cn.nspname) || '.' || quote_ident(co.collname) FROM pg_collation co \
                      JOIN pg_namespace cn ON cn.oid = co.collnamespace WHERE co.oid = t.typcollation) END, \
                obj_description(t.oid, 'pg_type'), \
                (SELECT c.relkind::text FROM pg_class c WHERE c.oid = t.typrelid) \
         FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
         WHERE n.nspname = ANY($1) AND t.typtype IN ('e', 'd', 'c', 'r', 'b') \
           AND t.typcategory <> 'A' AND {} \
         ORDER BY t.oid",
        not_extension_member("pg_type", "t.oid")
    );
    let rows = client
        .query(&sql, &[&schemas])
        .await
        .ctx(|| "reading types".into())?;
    let mut types = Vec::new();
    for r in &rows {
        let oid: u32 = r.get(0);
        let name = QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2));
        let typtype: String = r.get(3);
        let kind = match typtype.as_str() {
            "e" => {
                let labels = client
                    .query(
                        "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder",
                        &[&oid],
                    )
                    .await
                    .ctx(|| format!("reading labels of enum {}", name.display_name()))?;
                UserTypeKind::Enum {
                    labels: labels.iter().map(|l| l.get(0)).collect(),
                }
            }
            "d" => {
                let cons = client
                    .query(
                        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
                         WHERE contypid = $1 AND contype = 'c' ORDER BY conname",
                        &[&oid],
                    )
                    .await
                    .ctx(|| format!("reading constraints of domain {}", name.display_name()))?;
                UserTypeKind::Domain {
                    base: r.get(4),
                    not_null: r.get(5),
                    default: r.get(6),
                    collation: r.get(7),
                    constraints: cons
                        .iter()
                        .map(|c| Constraint {
                            name: c.get(0),
                            definition: c.get(1),
                        })
                        .collect(),
                }
            }
            "c" => {
                // Row types of tables and views come with them; only free-standing composites.
                if r.get::<_, Option<String>>(9).as_deref() != Some("c") {
                    continue;
                }
                let attrs = client
                    .query(
                        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) || \
                                CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0 THEN \
                                  ' COLLATE ' || (SELECT quote_ident(cn.nspname) || '.' || quote_ident(co.collname) \
                                  FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace \
                                  WHERE co.oid = a.attcollation) ELSE '' END \
                         FROM pg_type ct JOIN pg_attribute a ON a.attrelid = ct.typrelid \
                         JOIN pg_type t ON t.oid = a.atttypid \
                         WHERE ct.oid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                        &[&oid],
                    )
                    .await
                    .ctx(|| format!("reading attributes of type {}", name.display_name()))?;
                UserTypeKind::Composite {
                    attributes: attrs.iter().map(|a| (a.get(0), a.get(1))).collect(),
                }
            }
            "r" => {
                let range = client
                    .query_one(
                        "SELECT format_type(r.rngsubtype, NULL), \
                                CASE WHEN r.rngsubdiff <> 0 THEN r.rngsubdiff::regproc::text END, \
                                CASE WHEN r.rngmultitypid <> 0 THEN format_type(r.rngmultitypid, NULL) END \
                         FROM pg_range r WHERE r.rngtypid = $1",
                        &[&oid],
                    )
                    .await
                    .ctx(|| format!("reading range type {}", name.display_name()))?;
                UserTypeKind::Range {
                    subtype: range.get(0),
                    subtype_diff: range.get(1),
                    multirange: range.get(2),
                }
            }
            _ => {
                return Err(Error::Definite(format!(
                    "type {} is a base type implemented in C, which kuaka cannot recreate; install the extension or code that defines it on the target, or exclude the tables that use it",
                    name.display_name()
                )));
            }
        };
        types.push(UserType {
            name,
            kind,
            comment: r.get(8),
        });
    }
    Ok(types)
}

async fn read_routines(client: &Client, schemas: &[String]) -> Result<Vec<Routine>> {
    let sql = format!(
        "SELECT p.oid, n.nspname::text, p.proname::text, p.prokind::text, \
                pg_get_function_identity_arguments(p.oid), \
                CASE WHEN p.prokind IN ('f', 'p') THEN pg_get_functiondef(p.oid) END, \
                a.aggtransfn::regproc::text, format_type(a.aggtranstype, NULL), \
                CASE WHEN a.aggfinalfn <> 0 THEN a.aggfinalfn::regproc::text END, \
                a.agginitval, CASE WHEN a.aggcombinefn <> 0 THEN a.aggcombinefn::regproc::text END, \
                a.aggkind::text, l.lanname::text \
         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         JOIN pg_language l ON l.oid = p.prolang \
         LEFT JOIN pg_aggregate a ON a.aggfnoid = p.oid \
         WHERE n.nspname = ANY($1) AND p.prokind IN ('f', 'p', 'a') AND {} \
         ORDER BY p.oid",
        not_extension_member("pg_proc", "p.oid")
    );
    let rows = client
        .query(&sql, &[&schemas])
        .await
        .ctx(|| "reading functions".into())?;
    let mut routines = Vec::new();
    for r in &rows {
        let name = QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2));
        let kind: String = r.get(3);
        let arguments: String = r.get(4);
        let language: String = r.get(12);
        if kind != "a" && (language == "c" || language == "internal") {
            return Err(Error::Definite(format!(
                "function {}({arguments}) is written in {language}, which kuaka cannot recreate; install it on the target yourself (for example through its extension) and rerun",
                name.display_name()
            )));
        }
        let (kind, definition) = match kind.as_str() {
            "a" => {
                if r.get::<_, String>(11) != "n" {
                    return Err(Error::Definite(format!(
                        "aggregate {}({arguments}) is an ordered-set or hypothetical-set aggregate, which kuaka does not recreate; create it on the target yourself or exclude what uses it",
                        name.display_name()
                    )));
                }
                let mut def = format!(
                    "CREATE AGGREGATE {name}({arguments}) (SFUNC = {}, STYPE = {}",
                    r.get::<_, String>(6),
                    r.get::<_, String>(7)
                );
                if let Some(f) = r.get::<_, Option<String>>(8) {
                    def.push_str(&format!(", FINALFUNC = {f}"));
                }
                if let Some(init) = r.get::<_, Option<String>>(9) {
                    def.push_str(&format!(", INITCOND = {}", quote_literal(&init)));
                }
                if let Some(f) = r.get::<_, Option<String>>(10) {
                    def.push_str(&format!(", COMBINEFUNC = {f}"));
                }
                def.push(')');
                (RoutineKind::Aggregate, def)
            }
            "p" => (RoutineKind::Procedure, r.get::<_, String>(5)),
            _ => (RoutineKind::Function, r.get::<_, String>(5)),
        };
        routines.push(Routine {
            name,
            arguments,
            kind,
            definition,
        });
    }
    Ok(routines)
}

async fn read_sequences(
    client: &Client,
    schemas: &[String],
    tables: &[Table],
    selection: &Selection,
) -> Result<Vec<Sequence>> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, format_type(s.seqtypid, NULL), s.seqstart, \
                    s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle, \
                    tn.nspname::text, tc.relname::text, ta.attname::text, d.deptype::text, \
                    ps.last_value \
             FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid \
                  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
             LEFT JOIN pg_class tc ON tc.oid = d.refobjid \
             LEFT JOIN pg_namespace tn ON tn.oid = tc.relnamespace \
             LEFT JOIN pg_attribute ta ON ta.attrelid = d.refobjid AND ta.attnum = d.refobjsubid \
             LEFT JOIN pg_sequences ps ON ps.schemaname = n.nspname AND ps.sequencename = c.relname \
             WHERE n.nspname = ANY($1) \
               AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_class'::regclass \
                               AND e.objid = c.oid AND e.deptype = 'e') \
             ORDER BY n.nspname, c.relname",
            &[&schemas],
        )
        .await
        .ctx(|| "reading sequences".into())?;
    let mut sequences = Vec::new();
    for r in &rows {
        let owner = match (
            r.get::<_, Option<String>>(9),
            r.get::<_, Option<String>>(10),
            r.get::<_, Option<String>>(11),
        ) {
            (Some(s), Some(t), Some(c)) => Some((QualifiedName::new(s, t), c)),
            _ => None,
        };
        // A sequence owned by a table that is not copied stays behind with it.
        if let Some((t, _)) = &owner {
            if !tables.iter().any(|x| &x.name == t) {
                continue;
            }
        } else if selection.is_filtered() {
            // Free-standing sequences move only when the whole database moves... or when
            // selected by name.
            let name = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
            if !selection.include.iter().any(|p| p.matches(&name)) {
                continue;
            }
        }
        let identity = r.get::<_, Option<String>>(12).as_deref() == Some("i");
        sequences.push(Sequence {
            name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            options: SequenceOptions {
                data_type: r.get(2),
                start: r.get(3),
                increment: r.get(4),
                min_value: r.get(5),
                max_value: r.get(6),
                cache: r.get(7),
                cycle: r.get(8),
            },
            owned_by: if identity { None } else { owner.clone() },
            identity_of: if identity { owner } else { None },
            last_value: r.get(13),
        });
    }
    Ok(sequences)
}

async fn read_views(client: &Client, schemas: &[String]) -> Result<Vec<View>> {
    let sql = format!(
        "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind = 'm', pg_get_viewdef(c.oid), \
                obj_description(c.oid, 'pg_class'), c.relispopulated \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('v', 'm') AND n.nspname = ANY($1) AND {} ORDER BY c.oid",
        not_extension_member("pg_class", "c.oid")
    );
    let rows = client
        .query(&sql, &[&schemas])
        .await
        .ctx(|| "reading views".into())?;
    let mut views = Vec::new();
    for r in &rows {
        let oid: u32 = r.get(0);
        let indexes = client
            .query(
                "SELECT ic.relname::text, pg_get_indexdef(i.indexrelid), i.indisunique FROM pg_index i \
                 JOIN pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = $1 ORDER BY ic.relname",
                &[&oid],
            )
            .await
            .ctx(|| "reading materialized view indexes".into())?;
        let column_comments = client
            .query(
                "SELECT a.attname::text, col_description(a.attrelid, a.attnum) FROM pg_attribute a \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND col_description(a.attrelid, a.attnum) IS NOT NULL",
                &[&oid],
            )
            .await
            .ctx(|| "reading view column comments".into())?;
        views.push(View {
            name: QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
            materialized: r.get(3),
            populated: r.get(6),
            query: r.get(4),
            indexes: indexes
                .iter()
                .map(|i| Index {
                    name: i.get(0),
                    definition: i.get(1),
                    unique: i.get(2),
                    columns: Vec::new(),
                })
                .collect(),
            comment: r.get(5),
            column_comments: column_comments
                .iter()
                .map(|c| (c.get(0), c.get(1)))
                .collect(),
        });
    }
    Ok(views)
}

/// Objects kuaka sees but does not move, each with a note on what to do.
async fn read_unsupported(
    client: &Client,
    schemas: &[String],
    tables: &[Table],
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let table_names: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
    let rows = client
        .query(
            &format!(
                "SELECT format('%I.%I', n.nspname, c.relname), p.polname::text FROM pg_policy p \
                 JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE {QUOTED_RELATION} = ANY($1)"
            ),
            &[&table_names],
        )
        .await
        .ctx(|| "reading row-level security policies".into())?;
    for r in &rows {
        notes.push(format!(
            "row-level security policy {:?} on {} is not copied; recreate it on the target after cutover",
            r.get::<_, String>(1),
            r.get::<_, String>(0)
        ));
    }
    let rows = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), r.rulename::text FROM pg_rewrite r \
             JOIN pg_class c ON c.oid = r.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE r.rulename <> '_RETURN' AND n.nspname = ANY($1)",
            &[&schemas],
        )
        .await
        .ctx(|| "reading rules".into())?;
    for r in &rows {
        notes.push(format!(
            "rule {:?} on {} is not copied; recreate it on the target (pg_get_ruledef) if you need it",
            r.get::<_, String>(1),
            r.get::<_, String>(0)
        ));
    }
    // Objects in the copied schemas that kuaka does not recreate, by kind.
    let others = format!(
        "SELECT 'foreign table ' || format('%I.%I', n.nspname, c.relname) FROM pg_class c \
           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'f' AND n.nspname = ANY($1) \
         UNION ALL SELECT 'extended statistics ' || format('%I.%I', n.nspname, s.stxname) FROM pg_statistic_ext s \
           JOIN pg_namespace n ON n.oid = s.stxnamespace WHERE n.nspname = ANY($1) \
         UNION ALL SELECT 'operator ' || format('%I.%s', n.nspname, o.oprname) FROM pg_operator o \
           JOIN pg_namespace n ON n.oid = o.oprnamespace WHERE n.nspname = ANY($1) AND {} \
         UNION ALL SELECT 'operator class ' || format('%I.%I', n.nspname, o.opcname) FROM pg_opclass o \
           JOIN pg_namespace n ON n.oid = o.opcnamespace WHERE n.nspname = ANY($1) AND {} \
         UNION ALL SELECT 'cast ' || format_type(c.castsource, NULL) || ' -> ' || format_type(c.casttarget, NULL) \
           FROM pg_cast c WHERE c.oid >= 16384 AND {} \
         ORDER BY 1",
        not_extension_member("pg_operator", "o.oid"),
        not_extension_member("pg_opclass", "o.oid"),
        not_extension_member("pg_cast", "c.oid"),
    );
    let rows = client
        .query(&others, &[&schemas])
        .await
        .ctx(|| "looking for objects kuaka does not copy".into())?;
    for r in &rows {
        notes.push(format!(
            "{} is not copied; create it on the target yourself (pg_dump --schema-only shows its definition)",
            r.get::<_, String>(0)
        ));
    }
    let row = client
        .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
        .await
        .ctx(|| "counting large objects".into())?;
    let large_objects: i64 = row.get(0);
    if large_objects > 0 {
        notes.push(format!(
            "{large_objects} large objects (pg_largeobject) are not copied; move them with pg_dump --large-objects"
        ));
    }
    notes.push("owners and privileges (GRANT) are not copied: objects on the target belong to the target user".into());
    Ok(notes)
}
