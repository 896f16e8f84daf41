//! `#[derive(Entity)]` for the `outbox` crate (re-exported as
//! `outbox::Entity` with its default `derive` feature).
//!
//! ```ignore
//! #[derive(Clone, Serialize, Deserialize, outbox::Entity)]
//! #[entity(kind = "account", table = "accounts")]
//! struct Account {
//!     #[entity(id)]
//!     id: String,
//!     balance: i64,
//! }
//! ```
//!
//! With `columns` on the struct, the kind's fields are stored in typed
//! columns of its table (named after the fields; the id field is the `id`
//! column) instead of one `data jsonb` column. Each field's SQL type comes
//! from its Rust type (`String` text, `i64` bigint, `i32` integer, `f64`
//! double precision, `bool` boolean, `DateTime<_>` timestamptz, `NaiveDate`
//! date, `Option<T>` as `T`, `serde_json::Value`, `Vec<_>` and maps jsonb),
//! or from `#[entity(sql = "numeric")]` on the field.
//!
//! An id field of type `Arc<str>` is shared with the store's key of the
//! entity (`Entity::shared_id`): a store of millions holds each id once.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::quote;
use syn::{Data, DeriveInput, Fields, GenericArgument, LitStr, PathArguments, Type, parse_macro_input};

/// Implements `outbox::entity::Entity`: `#[entity(kind = "...", table =
/// "...")]` (and `columns` for typed columns) on the struct, `#[entity(id)]`
/// on the id field (a `String`).
#[proc_macro_derive(Entity, attributes(entity))]
pub fn derive_entity(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

/// What `#[entity(...)]` on the struct says.
struct Kind {
    kind: LitStr,
    table: LitStr,
    columns: bool,
}

fn kind_of(input: &DeriveInput) -> syn::Result<Kind> {
    let (mut kind, mut table, mut columns) = (None, None, false);
    for attribute in input.attrs.iter().filter(|a| a.path().is_ident("entity")) {
        attribute.parse_nested_meta(|meta| {
            if meta.path.is_ident("kind") {
                kind = Some(meta.value()?.parse::<LitStr>()?);
            } else if meta.path.is_ident("table") {
                table = Some(meta.value()?.parse::<LitStr>()?);
            } else if meta.path.is_ident("columns") {
                columns = true;
            } else {
                return Err(meta.error("expected `kind = \"...\"`, `table = \"...\"` or `columns`"));
            }
            Ok(())
        })?;
    }
    let missing = |what: &str| syn::Error::new(Span::call_site(), format!("#[entity({what} = \"...\")] is required"));
    Ok(Kind { kind: kind.ok_or_else(|| missing("kind"))?, table: table.ok_or_else(|| missing("table"))?, columns })
}

/// What `#[entity(...)]` on a field says.
#[derive(Default)]
struct FieldAttributes {
    id: bool,
    sql: Option<LitStr>,
}

fn field_attributes(field: &syn::Field) -> syn::Result<FieldAttributes> {
    let mut found = FieldAttributes::default();
    for attribute in field.attrs.iter().filter(|a| a.path().is_ident("entity")) {
        attribute.parse_nested_meta(|meta| {
            if meta.path.is_ident("id") {
                found.id = true;
            } else if meta.path.is_ident("sql") {
                found.sql = Some(meta.value()?.parse::<LitStr>()?);
            } else {
                return Err(meta.error("expected `id` or `sql = \"...\"`"));
            }
            Ok(())
        })?;
    }
    Ok(found)
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let name = &input.ident;
    let kind = kind_of(input)?;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(name, "#[derive(Entity)] is for structs"));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new_spanned(name, "#[derive(Entity)] needs named fields"));
    };
    let mut id = None;
    let mut columns = Vec::new();
    for field in &fields.named {
        let attributes = field_attributes(field)?;
        let ident = field.ident.as_ref().expect("named fields have names");
        if attributes.id {
            if id.is_some() {
                return Err(syn::Error::new_spanned(ident, "only one field is #[entity(id)]"));
            }
            id = Some((ident.clone(), is_arc_str(&field.ty)));
            continue;
        }
        if kind.columns {
            let sql = match attributes.sql {
                Some(sql) => sql.value(),
                None => sql_type(&field.ty).ok_or_else(|| {
                    syn::Error::new_spanned(
                        &field.ty,
                        "no SQL type is known for this type: add #[entity(sql = \"...\")]",
                    )
                })?,
            };
            let column = ident.to_string();
            columns.push(quote! { ::outbox::entity::Column { name: #column, sql_type: #sql } });
        }
    }
    let (id, shared) = id.ok_or_else(|| syn::Error::new_spanned(name, "mark the id field with #[entity(id)]"))?;
    // An id held in an `Arc<str>` is shared with the store's key of the
    // entity: no second allocation of it.
    let shared_id = if shared {
        quote! {
            fn shared_id(&self) -> ::std::sync::Arc<str> {
                ::std::clone::Clone::clone(&self.#id)
            }
        }
    } else {
        quote! {}
    };
    let (kind_name, table) = (&kind.kind, &kind.table);
    let layout = if kind.columns {
        let id_field = id.to_string();
        quote! {
            const LAYOUT: ::outbox::entity::Layout =
                ::outbox::entity::Layout::Columns { id_field: #id_field, columns: &[#(#columns),*] };
        }
    } else {
        quote! {}
    };
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics ::outbox::entity::Entity for #name #type_generics #where_clause {
            const KIND: &'static str = #kind_name;
            const TABLE: &'static str = #table;
            #layout
            fn id(&self) -> &str {
                &self.#id
            }
            #shared_id
        }
    })
}

/// Whether a field's type is `Arc<str>` (by its last path segment).
fn is_arc_str(ty: &Type) -> bool {
    let Type::Path(path) = ty else { return false };
    let Some(last) = path.path.segments.last() else { return false };
    let PathArguments::AngleBracketed(args) = &last.arguments else { return false };
    last.ident == "Arc"
        && matches!(args.args.first(), Some(GenericArgument::Type(Type::Path(inner))) if inner.path.is_ident("str"))
}

/// The SQL type of a field from its Rust type, for the common cases.
fn sql_type(ty: &Type) -> Option<String> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    let name = last.ident.to_string();
    let inner = || match &last.arguments {
        PathArguments::AngleBracketed(args) => args.args.iter().find_map(|arg| match arg {
            GenericArgument::Type(inner) => Some(inner),
            _ => None,
        }),
        _ => None,
    };
    Some(
        match name.as_str() {
            "String" | "str" => "text",
            "i64" | "u32" | "isize" => "bigint",
            "i32" | "i16" | "u16" | "u8" | "i8" => "integer",
            "f64" | "f32" => "double precision",
            "bool" => "boolean",
            "DateTime" => "timestamptz",
            "NaiveDate" => "date",
            "NaiveDateTime" => "timestamp",
            "Decimal" => "numeric",
            "Value" | "Map" | "Vec" | "HashMap" | "BTreeMap" => "jsonb",
            "Option" => return sql_type(inner()?),
            _ => return None,
        }
        .to_owned(),
    )
}
